#!/usr/bin/env bash
# Paper Appendix A.1, "training from scratch" (Figs 11, 12): the seven-well energy trained by Implicit
# Diffusion from θ0 = (−7, ..., −7, 11) to θ* = (1.5, 0, 1.5, 0, 1.5, 0, 0), 40,000 steps, batch 1000,
# 10 seeds, plus Langevin at θ0 and at the trained θ. Measured: 7 min wall on 2 CPU cores
# (2 min 20 s of CPU time). Re-running with the same OUT resumes from the latest checkpoints.
set -euo pipefail
OUT=${OUT:-runs/paper-ebm-train}
idiff ebm-train --preset paper --out "$OUT" "$@"
# Beyond the paper: a Flax MLP energy on toy data (preset mlp; 4-5 min wall each on 2 CPU cores):
# idiff ebm-train --preset mlp --data eight-gaussians --out runs/ebm-mlp-eight-gaussians
# idiff ebm-train --preset mlp --data two-moons --out runs/ebm-mlp-two-moons
# Gradient evaluations to reach the same KL (implicit, nested T = 10, 100, short-run): python benchmarks/ebm.py
