#!/usr/bin/env bash
# Energy-based model trained from scratch: paper Appendix A.1, "training from scratch", Figs 11, 12.
# Reproduces: the seven-well energy trained by Implicit Diffusion from θ0 = (−7, ..., −7, 11) to
#   θ* = (1.5, 0, 1.5, 0, 1.5, 0, 0), 40,000 steps, batch 1000, 10 seeds, with Langevin at θ0 and at the
#   trained θ.
# Figures in $OUT/figures/: fig11_samples_contours.png (Fig 11), fig12_metrics.png (Fig 12, exact KLs and
#   NLL), grad_evals.png, sigma_theta.png, density_steps.png, report.md.
# Hardware: one host, one device (a CPU is enough).
# Time: 7 min wall on 2 CPU cores; SMOKE=1 (200 steps, batch 100, 2 seeds) ~1 min with its report; accelerator: not
#   measured here.
# Outputs: $OUT (default runs/paper-ebm-train): config.json, metrics.jsonl, methods/, summary.json,
#   checkpoints/, figures/. Re-running with the same OUT resumes.
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/paper-ebm-train$(pick "" -smoke)}
idiff ebm-train --preset paper --steps "$(pick 40000 200)" --batch "$(pick 1000 100)" --seeds "$(pick 10 2)" \
  --log-every "$(pick 100 50)" --ckpt-every "$(pick 10000 100)" --n-test "$(pick 10000 1000)" --out "$OUT" "$@"
idiff report "$OUT" --out "$OUT/figures"
# Beyond the paper: a Flax MLP energy on toy data (--energy mlp brings its settings; 4-5 min wall each on 2 CPU cores, 2026-11):
#   idiff ebm-train --energy mlp --data eight-gaussians --out runs/ebm-mlp-eight-gaussians
#   idiff ebm-train --energy mlp --data two-moons --out runs/ebm-mlp-two-moons
# Gradient evaluations to reach the same KL (implicit, nested T = 10, 100, short-run): python benchmarks/ebm.py
