#!/usr/bin/env bash
# Paper Appendix A.2, Table 3: pretrain θ0 on CIFAR-10 (cosine noise, Adam(0.9, 0.99, 1e-12) 2e-4, EMA 0.9999,
# batch 2048, label-conditioned 35.7 M-parameter U-Net, DDPM 1024 steps; 500k steps = 30 h on 16 TPUv2 in the paper).
# Needs the tfds array_record files once (TensorFlow only for this step):
#   pip install tensorflow && tfds build cifar10 --file_format=array_record --data_dir "$DATA_DIR"
# Multi-host TPU VM pod slice: run the same line on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd idiff && experiments/pretrain_cifar10.sh"
# (jax.distributed.initialize() is called when TPU_WORKER_HOSTNAMES lists several hosts; elsewhere set
#  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i on each process).
set -euo pipefail
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
OUT=${OUT:-runs/pretrain-cifar10-paper}
idiff pretrain cifar10 --preset paper --data-dir "$DATA_DIR" --out "$OUT" "$@"
idiff sample "$OUT" --n 64
# LSUN bedrooms (centre-cropped and resized, 64×64 by default; --image-size 256 for the DDPM LSUN network):
# idiff pretrain lsun-bedroom --preset paper --data-dir "$DATA_DIR" --image-size 256 --out runs/pretrain-lsun-paper
