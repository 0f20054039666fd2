#!/usr/bin/env bash
# Paper §5.1 / Appendix A.1: reward training of Langevin processes, all six methods, 10 seeds.
# Figs 4, 5, 8 (T = 1, 10, 100) and 10 land in $OUT/figures. 5-10 minutes on 2 CPU cores.
# Re-running with the same OUT resumes (docs/langevin.md).
set -euo pipefail
OUT=${OUT:-runs/paper-langevin-reward}
idiff langevin-reward --preset reference --baseline all --T 1,10,100 --steps 5000 --batch 1000 --seeds 10 --out "$OUT" "$@"
# The text of Appendix A.1 (unit hexagon, μ = (1, 0.95)) instead of the released constants:
# idiff langevin-reward --preset paper --out runs/paper-langevin-reward-textual
# With a KL penalty β KL(π*(θ0) ‖ π*(θ)) (docs/results.md):
# idiff langevin-reward --baseline implicit --steps 5000 --seeds 4 --beta 1 --out runs/langevin-reward-beta1
