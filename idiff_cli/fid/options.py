"""Options of `idiff evaluate-fid` (JAX-free: `--help` answers without starting JAX)."""

from __future__ import annotations

from idiff_cli import config as cfglib
from idiff_cli.config import Option
from idiff_cli.diffusion.options import text_to_image_options

SCHEMA = cfglib.Schema(
    "evaluate-fid",
    "Fréchet distance of samples to reference statistics (FID; pytorch-fid's definition with --features "
    "inception). Three modes: RUN_DIR (sample a pretrain, finetune or import run, a text-to-image one with "
    "--prompts FILE; fid.json goes there), --samples "
    "FILE.npz (fid.json goes to --out), --dataset NAME --save-stats FILE.npz (reference statistics).",
    (
        Option("run_dir", "path", None, "A pretrain or finetune run directory: its samples are evaluated and "
               "fid.json is written there.", argument=True),
        Option("step", int, None, "Checkpoint step to sample from.", minimum=0,
               rule="θ0 of pretrained.json (finetune: the latest weights)"),
        Option("n", int, 50000, "Number of samples.", flags=("--n",), positive=True),
        Option("batch", int, 250, "Samples per batch (split over the devices); features are kept per batch.",
               positive=True),
        Option("sampler", str, None, "euler-maruyama, probability-flow or ddpm.", choices="sampler",
               rule="the run's"),
        Option("sample_steps", int, None, "Sampling steps.", positive=True, rule="the run's"),
        Option("features", str, "mnist-classifier", "mnist-classifier (offline: 'FID (MNIST classifier "
               "features)'), inception (pytorch-fid's network: the standard FID), or package.module:function.",
               choices="features"),
        Option("inception_weights", "path", None, "The .npz converted from pytorch-fid's weights "
               "(python -m idiff_cli.fid.convert).", rule="$IDIFF_INCEPTION_WEIGHTS"),
        Option("ref_stats", "path", None, "Reference statistics: .npz with mu and sigma."),
        Option("dataset", str, None, "Reference dataset when no --ref-stats: mnist, colored-mnist, cifar10, "
               "lsun-bedroom or a tfds name.", rule="the run's"),
        Option("data_dir", "path", None, "tfds data directory.", rule="the run's"),
        Option("save_stats", "path", None, "Write the statistics of --dataset (or of --samples) to this .npz "
               "and exit."),
        Option("samples", "path", None, "Evaluate these images instead of sampling: an .npz (its array "
               "`images` or `samples`, or its only array), an .npy, or a directory of PNGs; [N, H, W, C], uint8 "
               "or float in [-1, 1]."),
        *text_to_image_options(prompt=False),
        cfglib.out_option("Output directory of fid.json with --samples"),
        cfglib.seed_option(),
        cfglib.CONFIG_OPTION,
    ),
)
