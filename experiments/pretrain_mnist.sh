#!/usr/bin/env bash
# MNIST pretraining: paper Appendix A.2, Table 1 (OU noise, Adam 1e-3, EMA 0.995, batch 32,
# Euler–Maruyama 256 steps). The θ0 of the MNIST finetuning experiments (finetune_mnist.sh).
# Figures: $OUT/figures/loss.png (denoising loss, gradient norm), $OUT/samples/ (a 64-image grid from
#   `idiff sample`), report.md (final loss); the FID of the model: fid_mnist.sh.
# Hardware: PRESET=cpu (default): 0.97 M-parameter U-Net, 2,400 steps, one host. PRESET=paper: the larger
#   U-Net, 18,000 steps, a GPU or a TPU VM (the same line on every worker of a multi-host slice).
# Time: PRESET=cpu 29 min on 2 CPU cores (2026-11-25; offline with the embedded digits when tfds 'mnist' is not
#   prepared); SMOKE=1 (a tiny U-Net, 20 steps) ~1 min; PRESET=paper on an accelerator: not measured here.
# Outputs: $OUT (default runs/pretrain-mnist-$PRESET): config.json, metrics.jsonl, checkpoints/,
#   pretrained.json, samples/, figures/. Re-running resumes (a larger --steps goes further).
source "$(dirname "$0")/lib.sh"
PRESET=${PRESET:-cpu}
OUT=${OUT:-runs/pretrain-mnist-$PRESET$(pick "" -smoke)}
idiff pretrain mnist --preset "$PRESET" ${SMOKE_PRETRAIN[@]+"${SMOKE_PRETRAIN[@]}"} --out "$OUT" "$@"
idiff sample "$OUT" --n "$(pick 64 16)"
idiff report "$OUT" --out "$OUT/figures"
