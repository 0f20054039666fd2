#!/usr/bin/env bash
# Creates the TPU VM (or slice) $TPU_NAME: ACCELERATOR_TYPE in ZONE on RUNTIME_VERSION (defaults in
# lib.sh). Extra arguments go to `gcloud compute tpus tpu-vm create`, e.g. --spot. Then: install.sh.
source "$(dirname "$0")/lib.sh"
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
  --version="$RUNTIME_VERSION" "$@"
