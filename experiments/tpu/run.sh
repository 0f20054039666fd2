#!/usr/bin/env bash
# Usage: run.sh [SCRIPT [ARGS...]]
# Runs experiments/SCRIPT (default pretrain_mnist.sh) with ARGS on every worker of $TPU_NAME at once, its
# run directory OUT=gs://$BUCKET/runs/$RUN_NAME (RUN_NAME: the script's name without .sh). The
# pretrain and finetune runs join the slice as one cluster (docs/cluster.md); WORKERS=0 runs a
# single-host script (langevin_reward.sh, ebm_train.sh) on worker 0 alone. SCRIPT_ENV="PRESET=paper ..."
# sets the script's own variables. Re-running resumes. Then: fetch.sh RUN_NAME.
# DRY_RUN=1 shows the command.
source "$(dirname "$0")/lib.sh"
SCRIPT=${1:-$DEFAULT_SCRIPT}
if [ ! -f "$ROOT/experiments/$SCRIPT" ]; then echo "error: no experiments/$SCRIPT in $ROOT" >&2; exit 2; fi
RUN_NAME=${RUN_NAME:-${SCRIPT%.sh}}
command=". venv/bin/activate && cd idiff && OUT=gs://$BUCKET/runs/$RUN_NAME ${SCRIPT_ENV:+$SCRIPT_ENV }experiments/$SCRIPT"
for arg in "${@:2}"; do command+=" $(quote "$arg")"; done
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="${WORKERS:-all}" --command="$command"
