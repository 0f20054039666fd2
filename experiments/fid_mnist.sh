#!/usr/bin/env bash
# FID (MNIST classifier features) of a pretrained MNIST run against the 5,000 embedded digits
# (offline; beyond the paper, which reports no MNIST FID). Writes $RUN/fid.json.
#   RUN=runs/pretrain-mnist-cpu N=1000 experiments/fid_mnist.sh [extra idiff evaluate-fid flags]
set -euo pipefail
RUN=${RUN:-runs/pretrain-mnist-cpu}
N=${N:-1000}
idiff evaluate-fid "$RUN" --n "$N" --batch 100 --features mnist-classifier "$@"
