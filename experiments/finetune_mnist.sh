#!/usr/bin/env bash
# Paper §5.2 / Appendix A.2, Figs 13-15: reward training of the MNIST model for brighter (λ > 0) and
# darker (λ < 0) digits with Implicit Diffusion (Algorithm 2), then the reward/KL curves overlaid.
# PRE: an `idiff pretrain mnist` run (default: runs/pretrain-mnist-cpu, from experiments/pretrain_mnist.sh).
# PRESET=paper gives Table 2 (M=4, T=64, batch 32; an accelerator); the default cpu preset (M=4, T=16, batch 8).
# λ/β = 100: the reward gained at the balance of reward and KL grows as λ/β (docs/results.md); at λ/β = 10 it is ~0.01.
# cpu preset: ~9 min per run on 2 CPU cores (about a minute compiling, ~4.7 s per outer step).
# Re-running with the same OUT resumes.
set -euo pipefail
PRE=${PRE:-runs/pretrain-mnist-cpu}
PRESET=${PRESET:-cpu}
OUT=${OUT:-runs/paper-finetune-mnist}
idiff finetune --from "$PRE" --preset "$PRESET" --reward brightness --lambda 10 --beta 0.1 --lr 1e-4 --steps 100 --fid-every 50 --out "$OUT/brighter" "$@"
idiff finetune --from "$PRE" --preset "$PRESET" --reward brightness --lambda -10 --beta 0.1 --lr 1e-4 --steps 100 --fid-every 50 --out "$OUT/darker" "$@"
idiff report "$OUT/brighter" "$OUT/darker" --out "$OUT"
idiff report "$OUT/brighter" "$OUT/darker" --x net_evals --out "$OUT"
