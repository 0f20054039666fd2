# Shared by the TPU VM scripts (sourced, not run). Each setting is a variable with a default; set it in
# the environment to change it. DRY_RUN=1 prints each command instead of running it.
set -euo pipefail
TPU_NAME=${TPU_NAME:-idiff}                            # the TPU VM, or slice of VMs
ZONE=${ZONE:-us-central2-b}                            # a zone that offers ACCELERATOR_TYPE
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-16}            # v4-16: a slice of 2 hosts with 4 chips each
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
BUCKET=${BUCKET:-idiff-runs}                           # run directories go to gs://$BUCKET/runs/
PROJECT=${PROJECT:-}                                   # empty: gcloud's configured project
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)   # this checkout
DEFAULT_SCRIPT=pretrain_mnist.sh                       # run.sh's figure script, fetch.sh's run name
WHERE=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then WHERE+=(--project="$PROJECT"); fi

# `quote ARG`: ARG as the shell reads it back: unchanged when plain, else in single quotes (after the
# `=` of a `--flag=value`).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./,=:@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[a-z-]+=)(.*)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote "${BASH_REMATCH[2]}")"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# `run CMD ARGS...`: prints the command as one line, then runs it unless DRY_RUN=1.
run() {
  local arg line
  line=$(quote "$1")
  for arg in "${@:2}"; do line+=" $(quote "$arg")"; done
  echo "$line"
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}
