#!/usr/bin/env bash
# Installs this checkout's committed HEAD on every worker of $TPU_NAME: copies it there as a tar archive,
# and makes ~/venv (Python 3.12 through uv, since the TPU images ship 3.10) with jax[tpu] and idiff.
# Re-running replaces ~/idiff and updates ~/venv. Then: run.sh.
source "$(dirname "$0")/lib.sh"
ARCHIVE=${TMPDIR:-/tmp}/idiff-$TPU_NAME.tar.gz
run git -C "$ROOT" archive --format=tar.gz --output="$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:idiff.tar.gz" "${WHERE[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="rm -rf idiff && mkdir idiff \
&& tar -xzf idiff.tar.gz -C idiff && python3 -m pip install --user --upgrade uv && python3 -m uv venv --python 3.12 venv \
&& python3 -m uv pip install --python venv/bin/python \"jax[tpu]\" -e ./idiff"
