"""Options of `idiff pretrain` and `idiff sample` (JAX-free: `--help` answers without starting JAX).

Pretraining defaults depend on the preset and on the dataset family (paper Tables 1 and 3): they
are `None` here, with their rule in `--help`, and `diffusion.pretrain.complete` fills them from
`DEFAULTS[(preset, family)]` and the preset's U-Net for the image size; `config.json` stores the
filled values.
"""

from __future__ import annotations

from typing import Any

from idiff_cli import config as cfglib
from idiff_cli.config import Option

# Tables 1 (MNIST) and 3 (CIFAR-10, LSUN) of the paper, per dataset family and preset.
DIGITS = dict(sde="ou", sampler="euler-maruyama", sample_steps=256, batch=32, lr=1e-3, adam_b1=0.9,
              adam_b2=0.999, adam_eps=1e-8, warmup_steps=0, grad_clip=0.0, ema_decay=0.995, flip=False)
NATURAL = dict(sde="cosine", sampler="ddpm", sample_steps=1024, batch=2048, lr=2e-4, adam_b1=0.9, adam_b2=0.99,
               adam_eps=1e-12, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999, flip=True)
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # ≈ 20 minutes on 2 CPU cores: 2,400 steps give mostly recognisable digits; re-run into the same
    # --out with a larger --steps to go on.
    ("cpu", "digits"): dict(DIGITS, steps=2400, log_every=50, sample_every=800, ckpt_every=400),
    # The paper: 18k steps (7 minutes on 4 TPUv2).
    ("paper", "digits"): dict(DIGITS, steps=18000, log_every=100, sample_every=2000, ckpt_every=2000),
    # Table 3's optimiser on a CPU-sized batch; EMA 0.999 (0.9999 averages over more steps than such a run has).
    ("cpu", "natural"): dict(NATURAL, batch=32, ema_decay=0.999, sample_steps=256, steps=5000, log_every=50,
                             sample_every=2500, ckpt_every=500),
    # Table 3 (500k steps, 30 h on 16 TPUv2 for CIFAR-10); warm-up and clipping as in Ho et al. (2020).
    ("paper", "natural"): dict(NATURAL, steps=500_000, warmup_steps=5000, grad_clip=1.0, log_every=100,
                               sample_every=10_000, ckpt_every=5000),
}
# The paper's CIFAR-10 model was label-conditioned.
CONDITIONAL_IN_PAPER = frozenset({"cifar10"})
# The U-Net fields that the preset's architecture for the image size fills (unet.PRESETS).
ARCH_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "groups")

BY_ARCH = "by preset and image size (cpu: {cpu}; paper: {paper})"


def _unit_interval(name: str, rule: str, text: str) -> Option:
    return Option(name, float, None, text, rule=rule, minimum=0, below=1)


def _cadences_after_log_every(cfg: Any) -> None:
    """--sample-every, --ckpt-every and --fid-every are multiples of --log-every (once it is known)."""
    if cfg.log_every is not None:
        cfglib.multiple_of(("sample_every", "ckpt_every", "fid_every"))(cfg)


PRETRAIN = cfglib.Schema(
    "pretrain",
    "Pretrain a denoising diffusion model θ0 (paper Appendix A.2, Tables 1 and 3). Denoising score "
    "matching with a Flax U-Net, Adam and EMA; the batch is sharded over all devices (and processes: set "
    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or run on a multi-host TPU VM). Writes "
    "config.json, metrics.jsonl, checkpoints/, pretrained.json, samples/ and figures/; re-running into the "
    "same --out resumes from the latest checkpoint.",
    (
        Option("dataset", str, None, "mnist, colored-mnist, cifar10, lsun-bedroom, any tensorflow-datasets image "
               "dataset name, or package.module:function. mnist falls back to 5,000 embedded digits when tfds "
               "data is absent.", argument=True, required=True),
        cfglib.preset_option({"cpu": "≈1 M-parameter U-Net, CPU-sized runs",
                              "paper": "DDPM-size U-Net, Tables 1/3"}, "cpu"),
        Option("data_dir", "path", None, "tfds data directory with array_record files.", defining=False,
               rule="~/tensorflow_datasets or $TFDS_DATA_DIR"),
        Option("image_size", int, None, "Crop and resize images of varying size to this.",
               rule="the dataset's (lsun-bedroom 64)", positive=True),
        Option("steps", int, None, "Training steps (may grow on resume).", defining=False, positive=True,
               rule="MNIST: cpu 2400, paper 18000; CIFAR/LSUN: cpu 5000, paper 500000"),
        Option("batch", int, None, "Global batch, split over all devices.", positive=True,
               rule="32; paper CIFAR/LSUN 2048"),
        Option("lr", float, None, "Adam learning rate.", positive=True, rule="1e-3 MNIST, 2e-4 CIFAR/LSUN"),
        _unit_interval("adam_b1", "0.9", "Adam β1."),
        _unit_interval("adam_b2", "0.999 MNIST, 0.99 CIFAR/LSUN", "Adam β2."),
        Option("adam_eps", float, None, "Adam ε.", positive=True, rule="1e-8 MNIST, 1e-12 CIFAR/LSUN"),
        Option("warmup_steps", int, None, "Linear learning-rate warm-up steps.", minimum=0,
               rule="0; paper CIFAR/LSUN 5000"),
        Option("grad_clip", float, None, "Clip the gradient's global norm (0: off).", minimum=0,
               rule="0; paper CIFAR/LSUN 1"),
        _unit_interval("ema_decay", "0.995 MNIST; CIFAR/LSUN cpu 0.999, paper 0.9999", "EMA decay of the weights."),
        Option("sde", str, None, "Noise process: ou or cosine.", choices="sde", rule="ou MNIST, cosine CIFAR/LSUN"),
        Option("sampler", str, None, "euler-maruyama, probability-flow or ddpm: the sampler of the grids and of θ0.",
               choices="sampler", rule="euler-maruyama MNIST, ddpm CIFAR/LSUN"),
        Option("sample_steps", int, None, "Sampling steps.", positive=True, rule="256; paper CIFAR/LSUN 1024"),
        Option("class_conditional", bool, None, "Condition the U-Net on labels.",
               rule="paper cifar10: yes; else no"),
        Option("flip", bool, None, "Random horizontal flips.", rule="CIFAR/LSUN yes, MNIST no"),
        Option("precondition", bool, True, "EDM-style preconditioning of ε_θ: keeps each image's colour "
               "through the sampler."),
        Option("ch", int, None, "U-Net base channels.", positive=True, rule="cpu 16; paper 64 (28×28) or 128"),
        Option("ch_mult", int, None, "Channel multipliers per resolution, e.g. 1,2,2.", many=True, positive=True,
               rule=BY_ARCH.format(cpu="1,4,4", paper="1,2,2 at 28×28")),
        Option("num_res_blocks", int, None, "Residual blocks per resolution.", positive=True,
               rule="cpu 1, paper 2"),
        Option("attn_resolutions", int, None, "Resolutions with self-attention, e.g. 16.", many=True, positive=True,
               rule=BY_ARCH.format(cpu="the lowest", paper="7 at 28×28, else 16")),
        Option("dropout", float, None, "Dropout.", minimum=0, below=1, rule="cpu 0; paper 0.1 (256×256: 0)"),
        Option("groups", int, None, "Group-norm groups.", positive=True, rule="cpu 8, paper 32"),
        Option("log_every", int, None, "Log metrics every N steps (metrics read once per N).", defining=False,
               positive=True, rule="cpu 50, paper 100"),
        Option("sample_every", int, None, "Write a sample grid every N steps (a multiple of --log-every).",
               defining=False, positive=True, rule="MNIST: cpu 800, paper 2000; CIFAR/LSUN: cpu 2500, paper 10000"),
        Option("ckpt_every", int, None, "Checkpoint every N steps (a multiple of --log-every).", defining=False,
               positive=True, rule="MNIST: cpu 400, paper 2000; CIFAR/LSUN: cpu 500, paper 5000"),
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
    presets={"cpu": {}, "paper": {}},  # their values depend on the dataset family: DEFAULTS above
    checks=(cfglib.check_tracking, _cadences_after_log_every,),
)


def _sample_out() -> Option:
    return Option("out", "path", None, "Output directory.", config=False, rule="RUN_DIR/samples")


SAMPLE = cfglib.Schema(
    "sample",
    "Sample a trained model (θ0 of a pretrain run, θ of a finetune run): a PNG grid (first 256 images) and "
    "an .npz of all n images (uint8).",
    (
        Option("run_dir", "path", None, "A pretrain or finetune run directory.", argument=True, required=True),
        Option("n", int, 64, "Number of images.", flags=("--n",), positive=True),
        Option("sampler", str, None, "euler-maruyama, probability-flow or ddpm.", choices="sampler",
               rule="the run's"),
        Option("sample_steps", int, None, "Sampling steps.", positive=True,
               rule="the run's (256 MNIST, 1024 CIFAR/LSUN paper)"),
        Option("weights", str, "ema", "ema (θ0) or params (the raw weights) of a pretrain run; a finetune run "
               "has only its finetuned weights.", choices=("ema", "params")),
        Option("step", int, None, "Checkpoint step.", minimum=0,
               rule="the one in pretrained.json (finetune: the latest)"),
        Option("batch", int, 256, "Images per jitted call, split over the devices.", positive=True),
        cfglib.seed_option(),
        _sample_out(),
        cfglib.CONFIG_OPTION,
    ),
)

