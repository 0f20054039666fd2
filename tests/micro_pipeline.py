"""A micro Stable Diffusion pipeline, for tests whose programs must compile in seconds: the sd_tiny
fixture's text encoder, tokenizer and scheduler with a one-level U-Net (8 channels; cross-attention in
its mid block only: 8 LoRA target modules) and a one-level VAE without attention (latent = image size,
8×8). In memory with random weights (`micro_model`) and as a diffusers pipeline directory
(`write_micro_pipeline`, for `idiff import diffusers`: those random U-Net and VAE weights, the fixture's
text encoder)."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from idiff_cli.diffusion import diffusers_io, pipeline_io
from idiff_cli.diffusion.model import ImportedConfig, TextToImageModel

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny" / "sd1"
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}
MICRO = {"unet": dict(block_out_channels=[8], down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"],
                      norm_num_groups=4, attention_head_dim=4, sample_size=8),
         "vae": dict(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                     up_block_types=["UpDecoderBlock2D"], mid_block_add_attention=False)}
MICRO_TARGETS = 8  # the default LoRA targets (to_q, to_k, to_v, to_out.0) of the mid block's two attentions


def micro_configs() -> dict[str, dict]:
    """The fixture's component configs with the micro U-Net's and VAE's fields."""
    configs = {name: json.loads((FIXTURE / name / file).read_text()) for name, file in CONFIG_FILES.items()}
    for name, fields in MICRO.items():
        configs[name].update(fields)
    return configs


def micro_model() -> TextToImageModel:
    """The micro pipeline with every weight (text encoder included) drawn as 0.3 × N(0, 1), seed 0."""
    t2i = pipeline_io.build(micro_configs(), FIXTURE / "tokenizer")
    shapes = pipeline_io.param_shapes(t2i)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    cfg = ImportedConfig("unknown", None, "ddpm", 2, t2i.image_shape[0], str(FIXTURE))
    return TextToImageModel(t2i, params, t2i.sde, cfg, t2i.image_shape, 0, 0, True, "imported")


def write_micro_pipeline(directory: pathlib.Path) -> pathlib.Path:
    """A diffusers pipeline directory: the fixture's files (float32 only), unet/ and vae/ replaced by
    the micro configs and `micro_model`'s weights of those networks. Returns `directory`."""
    shutil.copytree(FIXTURE, directory, ignore=shutil.ignore_patterns("*.fp16.safetensors"))
    params, configs = micro_model().params, micro_configs()
    for name in MICRO:
        (directory / name / CONFIG_FILES[name]).write_text(json.dumps(configs[name], indent=2))
        save_file(diffusers_io.tensors_from_params(params[name]), str(directory / name / diffusers_io.WEIGHTS))
    return directory
