"""Options of `idiff import` and `idiff export` (JAX-free: `--help` answers without starting JAX)."""

from __future__ import annotations

from idiff_cli import config as cfglib
from idiff_cli.config import Option

FORMATS = ("diffusers",)
VARIANTS = ("fp32", "fp16")

SCHEMA = cfglib.Schema(
    "import",
    "Import a published pretrained diffusion model as a run directory that `idiff sample`, `finetune` and "
    "`evaluate-fid` use like a pretrain run. diffusers: a UNet2DModel directory (config.json, "
    "diffusion_pytorch_model.safetensors, scheduler_config.json; or a DDPMPipeline directory with unet/ and "
    "scheduler/), e.g. google/ddpm-cifar10-32; or a Stable Diffusion 1.x/2.x pipeline directory "
    "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. "
    "stable-diffusion-v1-5/stable-diffusion-v1-5. Writes config.json, pretrained.json, checkpoints/ (the "
    "weights) and diffusers/ (the source's config and tokenizer files).",
    (
        Option("format", str, None, "Format of DIR.", argument=True, required=True, choices=FORMATS),
        Option("dir", "path", None, "The model directory.", argument=True, required=True),
        Option("dataset", str, "unknown", "The data the model was trained on (e.g. cifar10, lsun-bedroom): "
               "finetune's M/T/batch defaults and the FID reference statistics follow it."),
        Option("data_dir", "path", None, "tfds data directory of --dataset (for FID references).",
               defining=False, rule="~/tensorflow_datasets or $TFDS_DATA_DIR"),
        Option("sampler", str, None, "Default sampler of the run: ddpm (ancestral) or ddim (deterministic).",
               choices=("ddpm", "ddim"), rule="ddpm; ddim for a pipeline"),
        Option("sample_steps", int, None, "Default number of respaced sampling steps (of the model's training "
               "timesteps).", positive=True, rule="100; 50 for a pipeline"),
        Option("variant", str, "fp32", "Weights of a Stable Diffusion pipeline to read: fp32 "
               "(*.safetensors) or fp16 (diffusers' *.fp16.safetensors, kept in float16).",
               choices=VARIANTS),
        cfglib.out_option("Run directory"),
        cfglib.CONFIG_OPTION,
    ),
)


EXPORT = cfglib.Schema(
    "export",
    "Write a run's network in diffusers' format: an imported or finetuned DDPM (UNet2DModel) as a model "
    "directory (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json) that "
    "`UNet2DModel.from_pretrained` and `DDPMPipeline` load; a Stable Diffusion run as its unet/ directory "
    "(UNet2DConditionModel), to put into the pipeline it came from, or, for a LoRA finetune run, its adapters as "
    "pytorch_lora_weights.safetensors (`StableDiffusionPipeline.load_lora_weights`). Writes nothing when the "
    "run cannot be exported (idiff's own pretrain U-Net is not a diffusers architecture).",
    (
        Option("run_dir", "path", None, "An import run, or a finetune run of one.", argument=True, required=True),
        Option("format", str, "diffusers", "Format of the export.", choices=FORMATS),
        Option("step", int, None, "Checkpoint step of a finetune run.", minimum=0, rule="the latest"),
        Option("merged", bool, False, "A Stable Diffusion LoRA run: write the U-Net with the adapters merged in "
               "(unet/) instead of the adapters alone. A pixel model's LoRA run is always exported merged "
               "(diffusers' UNet2DModel pipelines load no LoRA files)."),
        Option("out", "path", None, "The directory to write (must not exist, or be empty).", config=False,
               required=True),
        cfglib.CONFIG_OPTION,
    ),
)
