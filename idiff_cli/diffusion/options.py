"""Options of `idiff pretrain` and `idiff sample` (JAX-free: `--help` answers without starting JAX).

Pretraining defaults depend on the preset and on the dataset family (paper Tables 1 and 3): `TABLE`
holds them, one row per (preset, family), and `--help` shows them. The U-Net is the preset's for the
dataset's image size (architectures.py), known once the data is read: `pretrain.main` completes the
config with it (`Schema.complete`); `config.json` stores every value.
"""

from __future__ import annotations

from typing import Any, Mapping

from idiff_cli import config as cfglib
from idiff_cli.config import Option
from idiff_cli.data import datasets
from idiff_cli.diffusion import architectures

# Tables 1 (MNIST) and 3 (CIFAR-10, LSUN) of the paper, per dataset family, and their CPU-sized runs.
DIGITS = dict(sde="ou", sampler="euler-maruyama", sample_steps=256, batch=32, lr=1e-3, adam_b1=0.9,
              adam_b2=0.999, adam_eps=1e-8, warmup_steps=0, grad_clip=0.0, ema_decay=0.995, flip=False)
NATURAL = dict(sde="cosine", sampler="ddpm", sample_steps=1024, batch=2048, lr=2e-4, adam_b1=0.9, adam_b2=0.99,
               adam_eps=1e-12, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, flip=True)
ROWS: dict[tuple[str, str], dict[str, Any]] = {
    # 2,400 steps give mostly recognisable digits (time on 2 CPU cores: docs/results.md); re-run into the
    # same --out with a larger --steps to go on.
    ("cpu", "digits"): dict(DIGITS, steps=2400, log_every=50, sample_every=800, ckpt_every=400),
    # The paper: 18k steps.
    ("paper", "digits"): dict(DIGITS, steps=18000, log_every=100, sample_every=2000, ckpt_every=2000),
    # Table 3's optimiser on a CPU-sized batch; EMA 0.999 (0.9999 averages over more steps than such a run has).
    ("cpu", "natural"): dict(NATURAL, batch=32, ema_decay=0.999, sample_steps=256, steps=5000, log_every=50,
                             sample_every=2500, ckpt_every=500),
    # Table 3 (500k steps); warm-up and clipping as in Ho et al. (2020).
    ("paper", "natural"): dict(NATURAL, steps=500_000, warmup_steps=5000, grad_clip=1.0, log_every=100,
                               sample_every=10_000, ckpt_every=5000),
}
# The paper's CIFAR-10 model was label-conditioned.
CONDITIONAL_IN_PAPER = frozenset({"cifar10"})


def _derived(values: Mapping[str, Any], context: Mapping[str, Any] | None) -> dict[str, Any]:
    """Label conditioning as in the paper; the image size (given, or the data's: `context`) and the
    preset's U-Net for it."""
    out: dict[str, Any] = {"class_conditional": values["preset"] == "paper" and values["dataset"] in CONDITIONAL_IN_PAPER}
    size = values["image_size"] or (context or {}).get("image_size")
    if size is not None:
        out.update(image_size=size, **architectures.BY_PRESET[values["preset"]](size))
    return out


BY_SIZE = "the preset's U-Net for the image size (architectures.py; cpu: {cpu}; paper: {paper})"
TABLE = cfglib.Table(
    family=lambda values, context: datasets.family(values["dataset"]),
    what="dataset family",
    rows=ROWS,
    derive=_derived,
    derived_help={
        "image_size": "the dataset's (lsun-bedroom 64)",
        "class_conditional": "paper preset on cifar10: yes; else no",
        "ch": BY_SIZE.format(cpu="16", paper="64 at 28×28, else 128"),
        "ch_mult": BY_SIZE.format(cpu="1,4,4 up to 32×32", paper="1,2,2 at 28×28"),
        "num_res_blocks": BY_SIZE.format(cpu="1", paper="2"),
        "attn_resolutions": BY_SIZE.format(cpu="the lowest", paper="7 at 28×28, else 16"),
        "dropout": BY_SIZE.format(cpu="0", paper="0.1; 0 above 64×64"),
        "groups": BY_SIZE.format(cpu="8", paper="32"),
    },
)


def _unit_interval(name: str, text: str) -> Option:
    return Option(name, float, None, text, minimum=0, below=1)


PRETRAIN = cfglib.Schema(
    "pretrain",
    "Pretrain a denoising diffusion model θ0 (paper Appendix A.2, Tables 1 and 3). Denoising score "
    "matching with a Flax U-Net, Adam and EMA; the batch is sharded over all devices (and processes: joined "
    "by themselves on a multi-host TPU VM, a Slurm step or an Open MPI job, or with JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES, JAX_PROCESS_ID; docs/cluster.md). Writes "
    "config.json, metrics.jsonl, checkpoints/, pretrained.json, samples/ and figures/; re-running into the "
    "same --out resumes from the latest checkpoint.",
    (
        Option("dataset", str, None, "mnist, colored-mnist, cifar10, lsun-bedroom, any tensorflow-datasets image "
               "dataset name, or package.module:function. mnist falls back to 5,000 embedded digits when tfds "
               "data is absent. Its family picks the defaults: digits (mnist, colored-mnist, fashion_mnist, kmnist, "
               "emnist: Table 1) or natural (the others: Table 3).", argument=True, required=True),
        cfglib.preset_option({"cpu": "≈1 M-parameter U-Net, CPU-sized runs",
                              "paper": "DDPM-size U-Net, Tables 1/3"}, "cpu"),
        Option("data_dir", "path", None, "tfds data directory with array_record files.", defining=False,
               rule="~/tensorflow_datasets or $TFDS_DATA_DIR"),
        Option("image_size", int, None, "Crop and resize images of varying size to this.", positive=True),
        Option("steps", int, None, "Training steps (may grow on resume).", defining=False, positive=True),
        Option("batch", int, None, "Global batch, split over --devices devices of every process.", positive=True),
        cfglib.devices_option(),
        Option("lr", float, None, "Adam learning rate.", positive=True),
        _unit_interval("adam_b1", "Adam β1."),
        _unit_interval("adam_b2", "Adam β2."),
        Option("adam_eps", float, None, "Adam ε.", positive=True),
        Option("warmup_steps", int, None, "Linear learning-rate warm-up steps.", minimum=0),
        Option("grad_clip", float, None, "Clip the gradient's global norm (0: off).", minimum=0),
        _unit_interval("ema_decay", "EMA decay of the weights."),
        Option("sde", str, None, "Noise process: ou or cosine.", choices="sde"),
        Option("sampler", str, None, "euler-maruyama, probability-flow or ddpm: the sampler of the grids and of θ0.",
               choices="sampler"),
        Option("sample_steps", int, None, "Sampling steps.", positive=True),
        Option("class_conditional", bool, None, "Condition the U-Net on labels."),
        Option("flip", bool, None, "Random horizontal flips."),
        Option("precondition", bool, True, "EDM-style preconditioning of ε_θ: keeps each image's colour "
               "through the sampler."),
        Option("ch", int, None, "U-Net base channels.", positive=True),
        Option("ch_mult", int, None, "Channel multipliers per resolution, e.g. 1,2,2.", many=True, positive=True),
        Option("num_res_blocks", int, None, "Residual blocks per resolution.", positive=True),
        Option("attn_resolutions", int, None, "Resolutions with self-attention, e.g. 16.", many=True, positive=True),
        Option("dropout", float, None, "Dropout.", minimum=0, below=1),
        Option("groups", int, None, "Group-norm groups.", positive=True),
        Option("log_every", int, None, "Log metrics every N steps (metrics read once per N).", defining=False,
               positive=True),
        Option("sample_every", int, None, "Write a sample grid every N steps (a multiple of --log-every).",
               defining=False, positive=True),
        Option("ckpt_every", int, None, "Checkpoint every N steps (a multiple of --log-every).", defining=False,
               positive=True),
        Option("keep_checkpoints", int, 3, "Keep the last k checkpoints.", defining=False, positive=True),
        Option("grid_n", int, 64, "Images per sample grid.", defining=False, positive=True),
        Option("fid_every", int, 0, "Log the FID of --fid-n fixed-key samples of the EMA weights every N steps "
               "(0: off).", defining=False, minimum=0),
        Option("fid_n", int, 500, "Samples per periodic FID.", defining=False, positive=True),
        Option("fid_features", str, "mnist-classifier", "Feature extractor of the periodic FID: mnist-classifier "
               "(offline, 28×28) or inception (needs its weights, see `idiff evaluate-fid --help`).",
               defining=False, choices="features"),
        Option("out", "path", None, "Run directory.", config=False, rule="runs/pretrain-<dataset>-<timestamp>"),
        cfglib.seed_option(),
        *cfglib.tracking_options(),
        cfglib.CONFIG_OPTION,
    ),
    checks=(cfglib.check_tracking, cfglib.multiple_of(("sample_every", "ckpt_every", "fid_every"))),
    table=TABLE,
)


def _sample_out() -> Option:
    return Option("out", "path", None, "Output directory.", config=False, rule="RUN_DIR/samples")


def text_to_image_options(prompt: bool = True) -> tuple[Option, ...]:
    """The prompt, guidance, DDIM η and dtype of sampling an imported Stable Diffusion run (sample,
    evaluate-fid); refused on other runs (text2image_options.check)."""
    prompts = (Option("prompt", str, None, "Text prompt of a text-to-image run (--n images of it).",
                      rule="none: give --prompt or --prompts"),) if prompt else ()
    return prompts + (
        Option("prompts", "path", None, "File of prompts of a text-to-image run, one per line (blank lines "
               "skipped)."),
        Option("negative_prompt", str, None, "Negative prompt of classifier-free guidance.", rule='""'),
        Option("guidance", float, None, "Classifier-free guidance scale g: ε_uncond + g (ε_cond − ε_uncond); "
               "g ≤ 1 samples the conditional model alone, as diffusers does.", minimum=0, rule="7.5"),
        Option("ddim_eta", float, None, "η of the ddim sampler (0: deterministic; 1: DDPM-like noise).",
               minimum=0, rule="0"),
        Option("dtype", str, None, "Weights and activations of a text-to-image run: float32 or bfloat16.",
               choices=("float32", "bfloat16"), rule="float32"),
    )


SAMPLE = cfglib.Schema(
    "sample",
    "Sample a trained model (θ0 of a pretrain run, θ of a finetune run, an imported model): a PNG grid "
    "(first 256 images) and an .npz of all the images (uint8). A text-to-image run samples --n images per "
    "prompt (--prompt or --prompts).",
    (
        Option("run_dir", "path", None, "A pretrain, finetune or import run directory.", argument=True,
               required=True),
        Option("n", int, 64, "Number of images (of a text-to-image run: per prompt).", flags=("--n",),
               positive=True),
        Option("sampler", str, None, "euler-maruyama, probability-flow, ddpm or ddim (imported models: ddpm or "
               "ddim).", choices="sampler", rule="the run's"),
        Option("sample_steps", int, None, "Sampling steps.", positive=True,
               rule="the run's (256 MNIST, 1024 CIFAR/LSUN paper, 50 SD)"),
        Option("weights", str, "ema", "ema (θ0) or params (the raw weights) of a pretrain run; a finetune run "
               "has only its finetuned weights.", choices=("ema", "params")),
        Option("step", int, None, "Checkpoint step.", minimum=0,
               rule="the one in pretrained.json (finetune: the latest)"),
        Option("batch", int, 256, "Images per jitted call, split over the devices.", positive=True),
        *text_to_image_options(),
        cfglib.seed_option(),
        _sample_out(),
        cfglib.CONFIG_OPTION,
    ),
)

