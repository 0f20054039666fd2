#!/usr/bin/env bash
# Usage: fetch.sh [RUN_NAME]
# Copies gs://$BUCKET/runs/RUN_NAME (default pretrain_mnist) to runs/RUN_NAME here; re-running copies
# what changed.
source "$(dirname "$0")/lib.sh"
RUN_NAME=${1:-${DEFAULT_SCRIPT%.sh}}
run mkdir -p "runs/$RUN_NAME"
run gcloud storage rsync --recursive "gs://$BUCKET/runs/$RUN_NAME" "runs/$RUN_NAME"
