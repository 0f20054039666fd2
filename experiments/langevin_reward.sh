#!/usr/bin/env bash
# Langevin reward training: paper §5.1 and Appendix A.1, Figs 4, 5, 8, 9, 10.
# Reproduces: the six methods (Implicit Diffusion, Langevin at θ0, nested loop, unrolling, short-run,
#   guidance) at T = 1, 10, 100 on the released constants, 5,000 outer steps, batch 1000, 10 seeds.
# Figures in $OUT/figures/: fig4_samples_contours.png (Fig 4), fig5_reward_loglik.png (Fig 5),
#   fig8_grad_evals.png (Fig 8), fig9_bands.png (Fig 9), fig10_dynamics.png and fig10_sigma_theta.png
#   (Fig 10), report.md (final reward and log-likelihood, mean and min..max over seeds).
# Hardware: one host, one device (2-D particles; a CPU is enough).
# Time: 5-10 min on 2 CPU cores; SMOKE=1 (T = 1, 10, 40 steps, batch 100, 2 seeds) ~1 min with its report (2 min on a loaded machine);
#   accelerator: not measured here.
# Outputs: $OUT (default runs/paper-langevin-reward): config.json, metrics.jsonl, arrays.npz, methods/,
#   checkpoints/, figures/. Re-running with the same OUT resumes (docs/langevin.md).
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/paper-langevin-reward$(pick "" -smoke)}
idiff langevin-reward --preset reference --baseline all --T "$(pick 1,10,100 1,10)" --steps "$(pick 5000 40)" \
  --batch "$(pick 1000 100)" --seeds "$(pick 10 2)" --log-every 10 --out "$OUT" "$@"
idiff report "$OUT" --out "$OUT/figures"
# The text of Appendix A.1 (unit hexagon, μ = (1, 0.95)) instead of the released constants:
#   idiff langevin-reward --preset paper --out runs/paper-langevin-reward-textual
# With a KL penalty β KL(π*(θ0) ‖ π*(θ)) (docs/results.md):
#   idiff langevin-reward --baseline implicit --steps 5000 --seeds 4 --beta 1 --out runs/langevin-reward-beta1
