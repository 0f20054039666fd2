#!/usr/bin/env bash
# FID of the pretrained MNIST and colored-MNIST models: "FID (MNIST classifier features)" against the
# 5,000 embedded digits (offline; beyond the paper, which reports no MNIST FID; not comparable with
# Inception FID). RUNS: the run directories (default: the two cpu-preset pretrain runs).
# Figures: none; each run's fid.json (FID, samples, features).
# Hardware: one host (a CPU is enough).
# Time: N = 1000 samples at 256 sampling steps: minutes per run on 2 CPU cores (the cpu U-Net);
#   SMOKE=1 (N = 16, 4 sampling steps) under a minute; accelerator: not measured here.
#   RUNS="runs/pretrain-mnist-cpu" N=1000 experiments/fid_mnist.sh [extra idiff evaluate-fid flags]
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-"runs/pretrain-mnist-cpu runs/pretrain-colored-mnist-cpu"}
N=${N:-$(pick 1000 16)}
for run in $RUNS; do
  idiff evaluate-fid "$run" --n "$N" --batch "$(pick 100 16)" --features mnist-classifier \
    ${SMOKE_FID[@]+"${SMOKE_FID[@]}"} "$@"
done
