#!/usr/bin/env bash
# Paper §5.2, Figs 7 and 16 on the offline colored-MNIST model: reward training for redder digits
# (the `red` reward: mean red channel minus the mean of the other channels).
# PRE: an `idiff pretrain colored-mnist` run (default: runs/pretrain-colored-mnist-cpu), preconditioned
# (the default; without it half of the samples are saturated squares, docs/results.md). cpu preset
# (M=4, T=16, batch 8); λ/β = 100 as for MNIST (experiments/finetune_mnist.sh): ~8.3 min on 2 CPU cores.
# Re-running with the same OUT resumes.
set -euo pipefail
PRE=${PRE:-runs/pretrain-colored-mnist-cpu}
PRESET=${PRESET:-cpu}
OUT=${OUT:-runs/paper-finetune-colored-mnist}
idiff finetune --from "$PRE" --preset "$PRESET" --reward red --lambda 10 --beta 0.1 --lr 1e-4 --steps 100 --out "$OUT/redder" "$@"
