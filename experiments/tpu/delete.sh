#!/usr/bin/env bash
# Deletes the TPU VM (or slice) $TPU_NAME without asking; the run directories stay in gs://$BUCKET.
source "$(dirname "$0")/lib.sh"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
