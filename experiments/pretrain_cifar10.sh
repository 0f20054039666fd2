#!/usr/bin/env bash
# CIFAR-10 pretraining: paper Appendix A.2, Table 3 (cosine noise, Adam(0.9, 0.99, 1e-12) 2e-4, EMA 0.9999,
# batch 2048, label-conditioned 35.7 M-parameter U-Net, DDPM 1024 steps; 500k steps = 30 h on 16 TPUv2 in
# the paper).
# Figures: $OUT/figures/loss.png, report.md; $OUT/samples/ (a 64-image grid); its FID: fid_cifar10.sh.
# Hardware: a GPU or a TPU VM pod slice. Multi-host: run the same line on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd idiff && experiments/pretrain_cifar10.sh"
#   (the processes join by themselves on a TPU VM slice, a Slurm step or an Open MPI job; elsewhere set
#   JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i on each process: docs/cluster.md).
# Time: the paper's 30 h on 16 TPUv2; not measured here. SMOKE=1 (a tiny U-Net, 20 steps) minutes on a CPU,
#   with the tfds data below.
# Needs the tfds array_record files once (TensorFlow only for this step):
#   pip install tensorflow && tfds build cifar10 --file_format=array_record --data_dir "$DATA_DIR"
# Outputs: $OUT (default runs/pretrain-cifar10-paper). Re-running resumes.
source "$(dirname "$0")/lib.sh"
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
OUT=${OUT:-runs/pretrain-cifar10-paper$(pick "" -smoke)}
idiff pretrain cifar10 --preset paper --data-dir "$DATA_DIR" ${SMOKE_PRETRAIN[@]+"${SMOKE_PRETRAIN[@]}"} --out "$OUT" "$@"
idiff sample "$OUT" --n "$(pick 64 16)"
idiff report "$OUT" --out "$OUT/figures"
# LSUN bedrooms (centre-cropped and resized, 64×64 by default; --image-size 256 for the DDPM LSUN network):
#   idiff pretrain lsun-bedroom --preset paper --data-dir "$DATA_DIR" --image-size 256 --out runs/pretrain-lsun-paper
