#!/usr/bin/env bash
# Paper Appendix A.2, Table 1: pretrain θ0 on MNIST (OU noise, Adam 1e-3, EMA 0.995, batch 32, Euler–Maruyama 256 steps).
# PRESET=cpu (default): 0.97 M-parameter U-Net, 2,400 steps (~30 min on 2 CPU cores; offline with the
# embedded digits when tfds 'mnist' is not prepared). PRESET=paper: the larger U-Net, 18,000 steps (a GPU or TPU VM).
# Re-running the same command resumes from the latest checkpoint (a larger --steps goes further).
set -euo pipefail
PRESET=${PRESET:-cpu}
OUT=${OUT:-runs/pretrain-mnist-$PRESET}
idiff pretrain mnist --preset "$PRESET" --out "$OUT" "$@"
idiff sample "$OUT" --n 64
# The colour-reward stand-in for CIFAR-10/LSUN, offline (~28 min on 2 CPU cores):
# idiff pretrain colored-mnist --preset cpu --out runs/pretrain-colored-mnist-cpu
