#!/usr/bin/env bash
# Redder colored-MNIST digits: paper §5.2, an offline stand-in for the colour rewards of Figs 7 and 16
# (LSUN and CIFAR-10 need downloads: finetune_lsun_bedroom.sh, finetune_cifar10_red.sh). Reward `red`
# (mean red channel minus the mean of the other channels), λ/β = 100, Implicit Diffusion.
# PRE: an `idiff pretrain colored-mnist` run (default runs/pretrain-colored-mnist-cpu, made here when
#   absent), preconditioned (the default; without it half of the samples are saturated squares,
#   docs/results.md).
# Figures: $OUT/redder/figures/reward_kl.png, evolution.png (the same-seed strip, as Figs 7 and 16),
#   samples/step_*.png; $OUT/report/report.md (final reward, KL, FID).
# Hardware: cpu preset (M = 4, T = 16, batch 8), one host.
# Time: 8.3 min on 2 CPU cores (2026-11-25; plus 29 min pretraining when PRE is absent); SMOKE=1 (a tiny model,
#   2 steps) a few minutes; accelerator: not measured here.
# Outputs: $PRE (the pretrained model), $OUT/redder (the finetune run), $OUT/report. Re-running resumes.
source "$(dirname "$0")/lib.sh"
PRESET=${PRESET:-cpu}
PRE=${PRE:-runs/pretrain-colored-mnist-cpu$(pick "" -smoke)}
OUT=${OUT:-runs/paper-finetune-colored-mnist$(pick "" -smoke)}
have_pretrained "$PRE" || idiff pretrain colored-mnist --preset cpu ${SMOKE_PRETRAIN[@]+"${SMOKE_PRETRAIN[@]}"} --out "$PRE"
idiff finetune --from "$PRE" --preset "$PRESET" --reward red --lambda 10 --beta 0.1 --lr 1e-4 --steps "$(pick 100 2)" \
  --fid-every "$(pick 50 2)" --label-every "$(pick 50 2)" ${SMOKE_FINETUNE[@]+"${SMOKE_FINETUNE[@]}"} --out "$OUT/redder" "$@"
idiff report "$OUT/redder" --out "$OUT/report"
