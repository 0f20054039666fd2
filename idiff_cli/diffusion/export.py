"""`idiff export RUN --format diffusers --out DIR`: a run's network in diffusers' format, so that a model
finetuned here runs in diffusers (and anything built on it).

* An imported DDPM (`UNet2DModel`), or a finetune run of one: DIR gets `config.json` and
  `scheduler_config.json` (the source's, as the import kept them) and `diffusion_pytorch_model.safetensors`
  (the run's weights: θ of the finetune run's latest or `--step` checkpoint), which
  `UNet2DModel.from_pretrained(DIR)` and `DDPMPipeline(unet, scheduler)` load.
* An imported Stable Diffusion pipeline: DIR/unet/ (`config.json` + the weights of its
  `UNet2DConditionModel`), the network finetuning changes; the pipeline's other components are the
  source's. A LoRA finetune run of one: DIR/pytorch_lora_weights.safetensors, its adapters with
  diffusers' key names (lora.to_diffusers: `unet.`-prefixed, α/r folded into B), which
  `StableDiffusionPipeline.load_lora_weights(DIR)` loads; with --merged, unet/ with the adapters merged.
  A LoRA run whose base is itself a finetune run is exported with --merged only (its file alone would
  leave the earlier finetuning out).
* A LoRA finetune run of a pixel model: merged, as any other run of it.

The weights are written name by name as `idiff import` reads them (diffusers_io.tensors_from_params,
the inverse of params_from_tensors), in the run's dtype. idiff's own pretrain U-Net (unet.py) is not a
diffusers architecture: its runs are refused in one line. DIR is checked before anything is read, and
written only once every file is ready (each file atomically). RUN and DIR may be gs:// prefixes.
"""

from __future__ import annotations

import pathlib
from typing import Any

from safetensors.numpy import save

from idiff_cli import storage
from idiff_cli.diffusion import diffusers_io, lora, pipeline_io
from idiff_cli.diffusion.model import FINETUNED, PRETRAINED, TextToImageModel, load, load_adapters
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir, atomic_write_bytes, console, read_json


def _identity(run_dir: pathlib.Path) -> str:
    """A run directory's name, the same for every spelling of a local one."""
    return str(run_dir if storage.is_remote(run_dir) else run_dir.resolve())


def source_run(run_dir: pathlib.Path) -> pathlib.Path:
    """The run a run's network comes from: a finetune run's `from`, followed to the pretrain or import run."""
    seen = {_identity(run_dir)}
    while (run_dir / FINETUNED).exists():
        run_dir = storage.path(read_json(run_dir / FINETUNED, ("from",))["from"])
        if _identity(run_dir) in seen:
            raise UserError(f"'{run_dir}': finetuned.json files that point at each other")
        seen.add(_identity(run_dir))
    if not (run_dir / PRETRAINED).exists():
        raise UserError(f"'{run_dir}' holds no trained model (no {PRETRAINED} or {FINETUNED})")
    return run_dir


def main(cfg: Any, out: pathlib.Path | None) -> pathlib.Path:
    """Writes the export into `out` (module docstring); returns it."""
    if out is None:
        raise UserError("missing --out (the directory to write the export into)")
    target = RunDir(out)
    target.check_new()
    run_dir = storage.path(cfg.run_dir)
    source = source_run(run_dir)
    copies = source / diffusers_io.SOURCE_DIR
    if pipeline_io.holds_pipeline(source):
        files = {"unet/config.json": diffusers_io.read_json(copies / "unet" / diffusers_io.CONFIG)}
        weights_name = f"unet/{diffusers_io.WEIGHTS}"
    elif diffusers_io.holds_source(source):
        files = {diffusers_io.CONFIG: diffusers_io.read_json(copies / diffusers_io.CONFIG),
                 diffusers_io.SCHEDULER: diffusers_io.read_json(copies / diffusers_io.SCHEDULER)}
        weights_name = diffusers_io.WEIGHTS
    else:
        raise UserError(f"'{run_dir}' holds idiff's own U-Net (a pretrain run), which is not a diffusers "
                        "architecture; export takes imported models and their finetune runs")
    record = read_json(run_dir / FINETUNED, ("from",)) if (run_dir / FINETUNED).exists() else {}
    if "lora" in record and pipeline_io.holds_pipeline(source) and not cfg.merged:
        if (storage.path(record["from"]) / FINETUNED).exists():
            raise UserError(f"'{run_dir}' adapts a finetuned model ({record['from']}): its LoRA file alone would "
                            "leave out that finetuning; use --merged")
        _, adapters, spec, step, _ = load_adapters(run_dir, cfg.step)
        target.create()
        lora.write(target.path / lora.LORA_WEIGHTS, adapters, spec.scale)
        console.print(f"exported {run_dir}'s LoRA adapters (rank {spec.rank}, {len(spec.targets)} modules, step "
                      f"{step}) -> {target.path / lora.LORA_WEIGHTS}", highlight=False)
        return target.path
    model = load(run_dir, step=cfg.step)
    params = model.params["unet"] if isinstance(model, TextToImageModel) else model.params
    weights = save(diffusers_io.tensors_from_params(params), metadata={"format": "pt"})
    target.create()
    for name, config in files.items():
        target.write_json(name, config)
    atomic_write_bytes(target.path / weights_name, weights)
    console.print(f"exported {run_dir} ({model.weights} weights, step {model.step}) -> {target.path} "
                  f"({', '.join([*files, weights_name])})", highlight=False)
    return target.path
