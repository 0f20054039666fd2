"""How sure is the label classifier of a model's digits at each sampler step count? For `label_kept`
(implicit/labels.py): a digit that the classifier labels with a small margin can change label under
a small change of θ, so the fraction of low-confidence samples bounds how stable the labels can be.

For each --steps value: `idiff sample RUN --sample-steps T --n N --seed S` (the same noise seed for
every T), then the label classifier (classifiers.LABELS) on the images: the mean top-class probability,
the fraction of images whose top probability is below 0.9 and below 0.6. One line per T, and first
the same for the classifier's held-out embedded digits (real MNIST) as the reference.

Usage: python tools/label_confidence.py RUN [--steps 16,32,64] [--n 512] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import classifiers
from idiff_cli.fid.features import to_unit_range


def confidences(x: np.ndarray) -> np.ndarray:
    """images [N, 28, 28, 1] in [0, 1] -> the label classifier's top-class probability [N]."""
    params, _ = classifiers.load_or_train(None, classifiers.LABELS)
    logits = jax.jit(lambda x: classifiers.MnistClassifier().apply({"params": params}, x)[1])(x)
    return np.asarray(jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--steps", default="16,32,64")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="where the samples go (default: a temporary directory)")
    args = ap.parse_args()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="label-confidence-"))
    print(f"{args.run}: {args.n} samples per T, seed {args.seed}, label classifier {classifiers.LABELS.name}")
    print(f"{'images':>14} {'mean top p':>11} {'p < 0.9':>8} {'p < 0.6':>8}")

    def line(name: str, p: np.ndarray) -> None:
        print(f"{name:>14} {p.mean():>11.3f} {np.mean(p < 0.9):>8.3f} {np.mean(p < 0.6):>8.3f}", flush=True)

    line("held-out real", confidences(classifiers.split(classifiers.LABELS)[1][0]))
    for T in map(int, args.steps.split(",")):
        done = subprocess.run(["idiff", "sample", args.run, "--sample-steps", str(T), "--n", str(args.n),
                               "--seed", str(args.seed), "--out", str(out / f"T{T}")], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"idiff sample failed:\n{done.stderr[-2000:]}")
        (npz,) = (out / f"T{T}").glob("*.npz")
        x = to_unit_range(np.load(npz)["images"]).mean(axis=-1, keepdims=True)
        line(f"T = {T}", confidences(x))


if __name__ == "__main__":
    main()
