#!/usr/bin/env bash
# Inception FID of a pretrained CIFAR-10 model with 50k samples (paper Table 1 reports 2.5; DDPM, 1024
# steps), the same definition as pytorch-fid. RUN: a pretrain or imported run (default runs/pretrain-cifar10).
# Figures: none; $RUN/fid.json.
# Hardware: an accelerator (50k samples of a 35.7 M-parameter U-Net).
# Time: not measured here; SMOKE=1 (N = 16 samples) checks the pipeline.
# Needs, once:
#   the converted weights:  curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
#                           python -m idiff_cli.fid.convert pt_inception-2015-12-05-6726825d.pth inception.npz
#   the tfds data:          pip install tensorflow && tfds build cifar10 --file_format=array_record
#   RUN=runs/pretrain-cifar10 IDIFF_INCEPTION_WEIGHTS=inception.npz experiments/fid_cifar10.sh
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/pretrain-cifar10}
STATS=${STATS:-runs/fid-stats/cifar10-train-inception.npz}
if [ "${DRY_RUN:-0}" != 1 ]; then
  : "${IDIFF_INCEPTION_WEIGHTS:?set IDIFF_INCEPTION_WEIGHTS to the converted .npz (see the header)}"
fi
[ -f "$STATS" ] || idiff evaluate-fid --dataset cifar10 --features inception --save-stats "$STATS"
idiff evaluate-fid "$RUN" --features inception --ref-stats "$STATS" --n "${N:-$(pick 50000 16)}" \
  --batch "${BATCH:-$(pick 500 16)}" "$@"
