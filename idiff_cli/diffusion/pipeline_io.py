"""Stable Diffusion pipeline directories (diffusers' `StableDiffusionPipeline`, SD 1.x and 2.x), read
without torch, and their copies in an imported run directory.

A pipeline directory holds `model_index.json` (the pipeline class and its components) and one folder per
component:

    unet/          config.json (UNet2DConditionModel), diffusion_pytorch_model[.fp16].safetensors
    vae/           config.json (AutoencoderKL), diffusion_pytorch_model[.fp16].safetensors
    text_encoder/  config.json (CLIPTextModel), model[.fp16].safetensors
    tokenizer/     tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)
    scheduler/     scheduler_config.json (the noise schedule: diffusers_io.scheduler_fields)

`read_pipeline` checks them in that order and reports the first problem in one line (UserError): an
unsupported pipeline class (SDXL, SD3, Flux, ControlNet, inpainting, …), a missing component or file,
`--variant fp16` without such files, an unsupported config field, a tokenizer that cannot be read, and a
weight whose name or shape does not match its config (the first such key, diffusers_io.params_from_tensors).

An imported run directory keeps copies of the configs and the tokenizer files under diffusers/
(`write_pipeline`), from which `run_pipeline` remakes the networks, the tokenizer and the noise process;
the weights are its checkpoint 0: {"unet": …, "vae": …, "text_encoder": …} (each {"params": …}).
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import storage
from idiff_cli.diffusion import diffusers_io, sd_unet
from idiff_cli.diffusion.clip_text import TOKENIZER_FILES, CLIPTextEncoder, load_tokenizer, text_fields, text_params
from idiff_cli.diffusion.ddpm import DiscreteDDPM
from idiff_cli.diffusion.text2image import TextToImage
from idiff_cli.diffusion.vae import AutoencoderKL, latent_factor, vae_fields, vae_params
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir, atomic_write_bytes

INDEX = "model_index.json"
PIPELINES = ("StableDiffusionPipeline",)
# Pipelines of model_index.json that `idiff import` reads as a pixel-space UNet2DModel (diffusers_io.py).
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
NETWORKS = ("unet", "vae", "text_encoder")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
DOWNLOAD = ("e.g. `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR "
            "--include '*.json' '*.txt' '*.safetensors'`")


class Pipeline(NamedTuple):
    """A checked SD pipeline: its config dicts (keyed by component, and "model_index"), the tokenizer
    directory, the model (text2image.TextToImage) and its variables {"unet", "vae", "text_encoder"}."""

    configs: dict[str, dict[str, Any]]
    tokenizer_dir: pathlib.Path
    model: TextToImage
    params: dict[str, Any]


def pipeline_class(directory: pathlib.Path) -> str | None:
    """The `_class_name` of the directory's model_index.json (None without one)."""
    index = directory / INDEX
    return str(diffusers_io.read_json(index).get("_class_name")) if index.is_file() else None


def is_text_to_image(directory: pathlib.Path) -> bool:
    """Whether `directory` is a pipeline directory of a class other than the pixel-space DDPM pipelines:
    an SD pipeline to read here, or one `read_pipeline` refuses by name."""
    kind = pipeline_class(directory)
    return kind is not None and kind not in PIXEL_PIPELINES


def _config_path(directory: pathlib.Path, component: str) -> pathlib.Path:
    name = diffusers_io.SCHEDULER if component == "scheduler" else diffusers_io.CONFIG
    return directory / component / name


def locate(directory: pathlib.Path, variant: str) -> dict[str, pathlib.Path]:
    """The config file of each component and the weights file of each network (keys "<network>_weights")."""
    kind = pipeline_class(directory)
    if kind not in PIPELINES:
        raise UserError(f"{directory / INDEX}: unsupported pipeline {kind!r}; idiff imports "
                        f"{', '.join(PIPELINES)} (Stable Diffusion 1.x and 2.x) and the pixel-space "
                        f"{', '.join(PIXEL_PIPELINES)}")
    paths = {}
    for component in COMPONENTS:
        if not (directory / component).is_dir():
            raise UserError(f"'{directory}' has no {component}/: download the whole pipeline ({DOWNLOAD})")
        if component != "tokenizer":
            paths[component] = _config_path(directory, component)
            if not paths[component].is_file():
                raise UserError(f"'{directory / component}' has no {paths[component].name} ({DOWNLOAD})")
    for network in NETWORKS:
        stem = WEIGHT_FILES[network]
        name = f"{stem}.fp16.safetensors" if variant == "fp16" else f"{stem}.safetensors"
        path = directory / network / name
        if not path.is_file():
            if variant == "fp16":
                raise UserError(f"--variant fp16: '{path}' does not exist (the pipeline has no fp16 files; "
                                "leave --variant at fp32)")
            pickles = sorted((directory / network).glob("*.bin"))
            if pickles:
                raise UserError(f"'{pickles[0]}' is a torch pickle, which idiff does not read: download the "
                                f"safetensors files ({DOWNLOAD})")
            raise UserError(f"'{directory / network}' has no {name} ({DOWNLOAD})")
        paths[f"{network}_weights"] = path
    return paths


def build(configs: Mapping[str, Mapping[str, Any]], tokenizer_dir: pathlib.Path) -> TextToImage:
    """The TextToImage model of the component configs and the tokenizer directory."""
    unet = sd_unet.CondUNet(**sd_unet.cond_unet_fields(configs["unet"]))
    vae_config = vae_fields(configs["vae"])
    vae = AutoencoderKL(**vae_config)
    text_encoder = CLIPTextEncoder(**text_fields(configs["text_encoder"]))
    sde = DiscreteDDPM(**diffusers_io.scheduler_fields(configs["scheduler"]))
    factor = latent_factor(vae_config)
    size = configs["unet"].get("sample_size")
    if not isinstance(size, int):
        raise UserError(f"unet/{diffusers_io.CONFIG}: sample_size must be one integer (the latent size), got {size!r}")
    latent_shape = (size, size, unet.in_channels)
    image_shape = (size * factor, size * factor, vae.in_channels)
    if unet.in_channels != vae.latent_channels:
        raise UserError(f"unet/{diffusers_io.CONFIG}: in_channels {unet.in_channels} differs from the VAE's "
                        f"latent_channels {vae.latent_channels}")
    if unet.cross_attention_dim != text_encoder.hidden_size:
        raise UserError(f"unet/{diffusers_io.CONFIG}: cross_attention_dim {unet.cross_attention_dim} differs from the "
                        f"text encoder's hidden_size {text_encoder.hidden_size}")
    scaling = float(configs["vae"].get("scaling_factor", 0.18215))
    return TextToImage(unet, vae, text_encoder, load_tokenizer(tokenizer_dir), sde, scaling, latent_shape,
                       image_shape)


def param_shapes(model: TextToImage) -> dict[str, Any]:
    """The variables of each network as ShapeDtypeStructs (no initialisation)."""
    key = jax.random.key(0)
    length = model.text_encoder.max_position_embeddings
    return {
        "unet": sd_unet.param_shapes(model.unet),
        "vae": jax.eval_shape(lambda: model.vae.init(key, jnp.zeros((1, *model.image_shape)))),
        "text_encoder": jax.eval_shape(lambda: model.text_encoder.init(key, jnp.zeros((1, length), jnp.int32))),
    }


def read_pipeline(directory: str | pathlib.Path, variant: str = "fp32") -> Pipeline:
    """The checked SD pipeline in `directory` (module docstring); fp16 weights stay float16."""
    directory = pathlib.Path(directory)
    paths = locate(directory, variant)
    configs = {c: diffusers_io.read_json(paths[c]) for c in COMPONENTS if c != "tokenizer"}
    configs["model_index"] = diffusers_io.read_json(directory / INDEX)
    model = build(configs, directory / "tokenizer")
    dtype = np.float16 if variant == "fp16" else np.float32
    tensors = {n: diffusers_io.read_weights(paths[f"{n}_weights"]) for n in NETWORKS}
    sources = {n: str(paths[f"{n}_weights"]) for n in NETWORKS}
    params = {
        "unet": diffusers_io.params_from_tensors(sd_unet.param_shapes(model.unet), tensors["unet"], sources["unet"],
                                                 what="UNet2DConditionModel", config="unet/config.json", dtype=dtype),
        "vae": vae_params(model.vae, tensors["vae"], sources["vae"], dtype),
        "text_encoder": text_params(model.text_encoder, tensors["text_encoder"], sources["text_encoder"], dtype),
    }
    return Pipeline(configs, directory / "tokenizer", model, params)


def write_pipeline(run_dir: RunDir, pipeline: Pipeline) -> None:
    """Copies of the pipeline's configs and tokenizer files into `run_dir`/diffusers/."""
    run_dir.write_json(f"{diffusers_io.SOURCE_DIR}/{INDEX}", pipeline.configs["model_index"])
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        name = _config_path(pathlib.Path(), component)
        run_dir.write_json(f"{diffusers_io.SOURCE_DIR}/{name}", pipeline.configs[component])
    copy_tokenizer(pipeline.tokenizer_dir, run_dir.path / diffusers_io.SOURCE_DIR / "tokenizer")


def copy_tokenizer(source: pathlib.Path, target: pathlib.Path) -> None:
    """The tokenizer files in `source` copied into `target`, each written whole (either may be gs://)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            atomic_write_bytes(target / name, (source / name).read_bytes())


def holds_pipeline(run_dir: pathlib.Path) -> bool:
    """Whether `run_dir` holds the diffusers/ copies of an SD pipeline (`write_pipeline`)."""
    return (run_dir / diffusers_io.SOURCE_DIR / INDEX).is_file()


def run_pipeline(run_dir: pathlib.Path) -> TextToImage:
    """The TextToImage model of a run directory, from its diffusers/ copies. The tokenizer library reads
    local files only: a run directory on an object store has its tokenizer files fetched into a
    temporary directory first (a few MB; the tokenizer holds them in memory once built)."""
    root = run_dir / diffusers_io.SOURCE_DIR
    configs = {c: diffusers_io.read_json(_config_path(root, c)) for c in ("unet", "vae", "text_encoder", "scheduler")}
    if not storage.is_remote(root):
        return build(configs, root / "tokenizer")
    with tempfile.TemporaryDirectory(prefix="idiff-tokenizer-") as local:
        copy_tokenizer(root / "tokenizer", pathlib.Path(local))
        return build(configs, pathlib.Path(local))
