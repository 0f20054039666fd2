#!/usr/bin/env bash
# MNIST brightness: paper §5.2 and Appendix A.2, Figs 6, 13, 14, 15. Reward training of the MNIST model
# (reward `brightness`) with Implicit Diffusion (Algorithm 2), as two sweeps of one run directory per value:
#   λ/β sweep (Figs 15 and 6's λ axis): λ/β = ±10, ±30, ±100 (β = 0.1, lr 1e-4), both signs: brighter and
#     darker digits. The runs at λ/β = +30 and −30 are Figs 14 and 13: their same-seed grids are
#     samples/step_*.png and figures/evolution.png.
#   lr sweep (Fig 6's η axis): lr = 3e-5, 3e-4 at λ/β = 30; its report also holds the lr 1e-4 run above.
# PRE: an `idiff pretrain mnist` run (default runs/pretrain-mnist-cpu, made here when absent, as
#   pretrain_mnist.sh does).
# Figures: $OUT/lambda-over-beta/report/: reward_kl_step.png (reward and KL of each λ/β: Figs 6, 15),
#   tradeoff.png (reward gain against the KL and against label_kept, one point per λ/β), report.md (final
#   reward, KL, FID of each run); $OUT/lr/report/ the same over lr; each run's figures/ (reward_kl.png,
#   evolution.png: Figs 13, 14).
# Hardware: PRESET=cpu (default: M = 4, T = 16, batch 8), one host; PRESET=paper (Table 2: M = 4, T = 64,
#   batch 32) needs an accelerator.
# Time: cpu preset 2.5–5 min per run on 2 CPU cores (compiling, 100 outer steps of ~1.3 s, FID and
#   label_kept at 3 points), 8 runs 36 min measured while other jobs shared the cores (plus ~30 min
#   pretraining when PRE is absent); SMOKE=1 (λ/β = ±30 and one lr,
#   2 steps, a tiny model) a few minutes; accelerator: not measured here.
# Outputs: $OUT (default runs/paper-finetune-mnist): lambda-over-beta/lb±V/, lr/lrV/, one finetune run
#   directory each. Re-running skips the finished runs and resumes an interrupted one; STEPS=N (not
#   --steps) asks for more steps.
source "$(dirname "$0")/lib.sh"
PRESET=${PRESET:-cpu}
PRE=${PRE:-runs/pretrain-mnist-cpu$(pick "" -smoke)}
OUT=${OUT:-runs/paper-finetune-mnist$(pick "" -smoke)}
STEPS=${STEPS:-$(pick 100 2)}
BETA=0.1
have_pretrained "$PRE" || idiff pretrain mnist --preset cpu ${SMOKE_PRETRAIN[@]+"${SMOKE_PRETRAIN[@]}"} --out "$PRE"
COMMON=(--from "$PRE" --preset "$PRESET" --reward brightness --beta "$BETA" --fid-every "$(pick 50 2)"
        --label-every "$(pick 50 2)"
        ${SMOKE_FINETUNE[@]+"${SMOKE_FINETUNE[@]}"})

runs=()
for lb in $(pick "-100 -30 -10 10 30 100" "-30 30"); do
  dir="$OUT/lambda-over-beta/lb$(printf '%+g' "$lb")"
  sweep_point "$dir" "$STEPS" "${COMMON[@]}" --lambda "$(awk "BEGIN { print $lb * $BETA }")" --lr 1e-4 "$@"
  runs+=("$dir")
done
idiff report "${runs[@]}" --out "$OUT/lambda-over-beta/report"

runs=("$OUT/lambda-over-beta/lb+30")
for lr in $(pick "3e-5 3e-4" "3e-4"); do
  dir="$OUT/lr/lr$lr"
  sweep_point "$dir" "$STEPS" "${COMMON[@]}" --lambda "$(awk "BEGIN { print 30 * $BETA }")" --lr "$lr" "$@"
  runs+=("$dir")
done
idiff report "${runs[@]}" --out "$OUT/lr/report"
