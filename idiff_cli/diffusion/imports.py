"""`idiff import diffusers DIR`: a diffusers `UNet2DModel` directory (diffusers_io.py) or a Stable
Diffusion pipeline directory (pipeline_io.py) as an imported run directory.

The model is read and checked first (one line for the first problem), so a bad source writes nothing.
The run directory it writes holds config.json (the `import` options), diffusers/ (copies of the source's
config files, and an SD pipeline's tokenizer files, from which the model layer remakes the networks and
the noise process), checkpoints/ (the Flax variables, orbax, step 0) and pretrained.json (image shape,
dataset, the weights' dtype), so `model.load` reads it like a pretrain run.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from idiff_cli.checkpoint import Checkpointer
from idiff_cli.config import to_dict
from idiff_cli.diffusion import pipeline_io
from idiff_cli.diffusion.diffusers_io import read_source, write_source
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir, console, default_run_dir

# Default sampler and step count: a pixel DDPM's ancestral chain, and SD's DDIM with diffusers' 50 steps.
DEFAULTS = {False: ("ddpm", 100), True: ("ddim", 50)}


def write_run(cfg: Any, params: Any, image_shape, run_dir: RunDir, write_configs) -> None:
    """The imported run directory (module docstring); pretrained.json last, as the mark of a complete run."""
    run_dir.create()
    write_configs(run_dir)
    run_dir.write_json("config.json", {"command": "import", **to_dict(cfg)})
    with Checkpointer(run_dir.path / "checkpoints", keep=1) as ckpt:
        ckpt.save(0, params)
    dtype = str(jax.tree_util.tree_leaves(params)[0].dtype)
    run_dir.write_json("pretrained.json", {"checkpoints": "checkpoints", "step": 0, "weights": "imported",
                                           "final": True, "image_shape": list(image_shape), "dtype": dtype,
                                           "num_classes": 0, "dataset": cfg.dataset, "data": f"imported from {cfg.dir}"})


def main(cfg: Any, out: pathlib.Path | None):
    """`idiff import diffusers DIR`: reads and checks the model before anything is written."""
    run_dir = RunDir(out or default_run_dir("import"))
    run_dir.check_new()
    text_to_image = pipeline_io.is_text_to_image(pathlib.Path(cfg.dir))
    if cfg.variant != "fp32" and not text_to_image:
        raise UserError(f"--variant {cfg.variant} applies to Stable Diffusion pipeline directories; '{cfg.dir}' is "
                        "a UNet2DModel directory (leave --variant at fp32)")
    sampler, steps = DEFAULTS[text_to_image]
    cfg = dataclasses.replace(cfg, sampler=cfg.sampler or sampler, sample_steps=cfg.sample_steps or steps)
    if text_to_image:
        source = pipeline_io.read_pipeline(cfg.dir, cfg.variant)
        params, sde, image_shape = source.params, source.model.sde, source.model.image_shape
        write = lambda r: pipeline_io.write_pipeline(r, source)  # noqa: E731
        what = f"Stable Diffusion pipeline, {cfg.variant}"
    else:
        source = read_source(cfg.dir)
        params, sde, image_shape = source.params, source.sde, source.image_shape
        write = lambda r: write_source(r, source)  # noqa: E731
        what = "UNet2DModel"
    sde.sampler(cfg.sample_steps, cfg.sampler)  # the default sampler's steps fit the chain
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    write_run(cfg, params, image_shape, run_dir, write)
    console.print(f"imported {cfg.dir} ({what}: {n / 1e6:.2f} M parameters, {image_shape[0]}×{image_shape[1]} "
                  f"images, {sde.num_train_timesteps} training timesteps) -> {run_dir.path}", highlight=False)
    return source
