#!/usr/bin/env bash
# Paper Appendix A.2, Table 1: pretrain θ0 on MNIST (OU noise, Adam 1e-3, EMA 0.995, batch 32, Euler–Maruyama 256 steps).
# PRESET=cpu (default): ≈1.1 M-parameter U-Net, 5,000 steps (~20 min on 2 idle CPU cores; offline with the
# embedded digits when tfds 'mnist' is not prepared). PRESET=paper: the larger U-Net, 18,000 steps (a GPU or TPU VM).
# Re-running the same command resumes from the latest checkpoint.
set -euo pipefail
PRESET=${PRESET:-cpu}
OUT=${OUT:-runs/pretrain-mnist-$PRESET}
idiff pretrain mnist --preset "$PRESET" --out "$OUT" "$@"
idiff sample "$OUT" --n 64
# The colour-reward stand-in for CIFAR-10/LSUN, offline:
# OUT=runs/pretrain-colored-mnist-cpu idiff pretrain colored-mnist --preset cpu --out runs/pretrain-colored-mnist-cpu
