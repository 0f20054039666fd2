# Shared by the experiment scripts (sourced, not run):
#   DRY_RUN=1  print each `idiff ...` command instead of running it, write nothing, exit 0
#   SMOKE=1    tiny sizes (minutes on a 2-core CPU): every size a script sets is `pick FULL SMOKE`
# Extra arguments of a script go to each of its `idiff` runs, last, so they override its flags.
set -euo pipefail

# `idiff ARGS...`: runs the CLI, or (DRY_RUN=1) prints the command (arguments shell-quoted where needed).
idiff() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    local arg line=idiff
    for arg in "$@"; do
      if [[ $arg =~ ^[A-Za-z0-9_./,=:@%+-]+$ ]]; then line+=" $arg"; else line+=" $(printf '%q' "$arg")"; fi
    done
    echo "$line"
  else
    command idiff "$@"
  fi
}

# `pick FULL SMOKE`: SMOKE's value under SMOKE=1, FULL otherwise.
pick() {
  if [ "${SMOKE:-0}" = 1 ]; then echo "$2"; else echo "$1"; fi
}

# `finished DIR STEPS`: whether DIR holds a finetune run that completed STEPS or more outer steps
# (finetuned.json marks the final checkpoint's weights); reads one small JSON file, loads no model.
finished() {
  [ -f "$1/finetuned.json" ] && python3 -c '
import json, sys
state = json.load(open(sys.argv[1] + "/finetuned.json"))
sys.exit(0 if state.get("final") and state.get("step", 0) >= int(sys.argv[2]) else 1)' "$1" "$2"
}

# `sweep_point DIR STEPS ARGS...`: one run of a sweep: `idiff finetune ARGS --steps STEPS --out DIR`,
# skipped (a line on stderr) when DIR already finished STEPS steps; an unfinished DIR resumes.
sweep_point() {
  local dir=$1 steps=$2
  shift 2
  if finished "$dir" "$steps"; then
    echo "skip $dir: finished ($steps steps)" >&2
  else
    idiff finetune "$@" --steps "$steps" --out "$dir"
  fi
}

# `have_pretrained DIR`: whether DIR holds a pretrained (or imported) model.
have_pretrained() {
  [ -f "$1/pretrained.json" ]
}

# Tiny sizes of the image commands under SMOKE=1 (empty otherwise): a U-Net of 8 channels and two
# resolutions, 20 pretraining steps; finetuning at T = 2, M = 1, batch 2; FID samples in 4 steps.
SMOKE_PRETRAIN=()
SMOKE_FINETUNE=()
SMOKE_FID=()
if [ "${SMOKE:-0}" = 1 ]; then
  SMOKE_PRETRAIN=(--steps 20 --batch 8 --ch 8 --ch-mult 1,2 --num-res-blocks 1 --attn-resolutions 14
                  --log-every 10 --ckpt-every 20 --sample-every 20 --sample-steps 16 --grid-n 16)
  SMOKE_FINETUNE=(--T 2 --M 1 --batch 2 --kl-n 2 --log-every 1 --sample-every 2 --ckpt-every 2 --grid-n 4
                  --fid-n 4)
  SMOKE_FID=(--sample-steps 4)
fi
