#!/usr/bin/env bash
# Brighter and redder LSUN bedrooms: paper Figs 7 and 17 (M = 2, T = 64, batch 16), here from the public
# google/ddpm-bedroom-256 (Ho et al. 2020) imported with `idiff import`. That model is NOT the paper's: it
# is 256×256 (the paper's was smaller) with linear betas; the script reproduces the setting, not the
# paper's exact model.
# Figures: $OUT/report/reward_kl_step.png (both rewards: Fig 17), report.md; each run's
#   figures/evolution.png and samples/step_*.png (Fig 7's same-seed strip).
# Hardware: an accelerator (a 256×256 U-Net of ~114 M parameters); the same line on every worker of a
#   TPU VM slice.
# Time: not measured here (benchmarks/imported.py shows what a CPU does with the 32×32 model: ~55 s per
#   outer step at T = 16, batch 4). SMOKE=1 (T = 2, batch 2, 2 steps) still needs the download below.
# Outputs: $PRE (the imported model), $OUT/brightness, $OUT/red (finetune runs), $OUT/report. Re-running
#   resumes.
#
# On a machine with internet access, once:
#   huggingface-cli download google/ddpm-bedroom-256 --local-dir models/ddpm-bedroom-256
source "$(dirname "$0")/lib.sh"
SRC=${SRC:-models/ddpm-bedroom-256}
PRE=${PRE:-runs/import-ddpm-bedroom-256}
OUT=${OUT:-runs/paper-finetune-lsun-bedroom$(pick "" -smoke)}
have_pretrained "$PRE" || idiff import diffusers "$SRC" --dataset lsun-bedroom --sample-steps 64 --out "$PRE"
for reward in brightness red; do
  idiff finetune --from "$PRE" --reward "$reward" --lambda 1000 --beta 1 --M 2 --T 64 --batch 16 \
    --lr 1e-4 --steps "$(pick 200 2)" ${SMOKE_FINETUNE[@]+"${SMOKE_FINETUNE[@]}"} \
    --out "$OUT/$reward" "$@"
done
idiff report "$OUT/brightness" "$OUT/red" --out "$OUT/report"
