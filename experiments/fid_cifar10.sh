#!/usr/bin/env bash
# Inception FID of a pretrained CIFAR-10 run with 50k samples (paper Table 1 reports 2.5; DDPM, 1024
# steps), the same definition as pytorch-fid. Needs, once:
#   the converted weights:  curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
#                           python -m idiff_cli.fid.convert pt_inception-2015-12-05-6726825d.pth inception.npz
#   the tfds data:          pip install tensorflow && tfds build cifar10 --file_format=array_record
#   RUN=runs/pretrain-cifar10 IDIFF_INCEPTION_WEIGHTS=inception.npz experiments/fid_cifar10.sh
set -euo pipefail
RUN=${RUN:-runs/pretrain-cifar10}
STATS=${STATS:-runs/fid-stats/cifar10-train-inception.npz}
: "${IDIFF_INCEPTION_WEIGHTS:?set IDIFF_INCEPTION_WEIGHTS to the converted .npz (see the header)}"
mkdir -p "$(dirname "$STATS")"
[ -f "$STATS" ] || idiff evaluate-fid --dataset cifar10 --features inception --save-stats "$STATS"
idiff evaluate-fid "$RUN" --features inception --ref-stats "$STATS" --n "${N:-50000}" --batch "${BATCH:-500}" "$@"
