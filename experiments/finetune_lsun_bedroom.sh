#!/usr/bin/env bash
# Paper Figs 7 and 17: reward training of an LSUN bedroom model for brightness and for red (M = 2, T = 64,
# batch 16), here from the public google/ddpm-bedroom-256 (Ho et al. 2020) imported with `idiff import`.
# That model is NOT the paper's: it is 256×256 (the paper's was smaller) with linear betas; the script
# reproduces the setting, not the paper's exact model. Needs an accelerator (a 256×256 U-Net of ~114 M
# parameters; see benchmarks/imported.py for what a CPU does with the 32×32 one). Re-running resumes.
#
# On a machine with internet access, once:
#   huggingface-cli download google/ddpm-bedroom-256 --local-dir models/ddpm-bedroom-256
set -euo pipefail
SRC=${SRC:-models/ddpm-bedroom-256}
PRE=${PRE:-runs/import-ddpm-bedroom-256}
OUT=${OUT:-runs/paper-finetune-lsun-bedroom}
[ -f "$PRE/pretrained.json" ] || idiff import diffusers "$SRC" --dataset lsun-bedroom --sample-steps 64 --out "$PRE"
idiff finetune --from "$PRE" --reward brightness --lambda 1000 --beta 1 --M 2 --T 64 --batch 16 --lr 1e-4 --steps 200 --out "$OUT/brightness" "$@"
idiff finetune --from "$PRE" --reward red --lambda 1000 --beta 1 --M 2 --T 64 --batch 16 --lr 1e-4 --steps 200 --out "$OUT/red" "$@"
idiff report "$OUT/brightness" "$OUT/red" --out "$OUT"
