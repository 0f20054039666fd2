"""Writes the LoRA oracle fixture under tests/fixtures/sd_tiny/lora/, and checks that a LoRA file idiff writes
loads in diffusers.

Run in the throwaway torch environment of tools/make_sd_fixture.py, plus peft (diffusers' LoRA loading needs it):

    /tmp/torchenv/bin/python -m pip install peft
    /tmp/torchenv/bin/python tools/make_lora_fixture.py fixture

* `lora/pytorch_lora_weights.safetensors`: a peft LoRA (LoraConfig r = 2, lora_alpha = 4, target_modules to_q,
  to_k, to_v, to_out.0) on the unet of tests/fixtures/sd_tiny/sd1, lora_A as peft initialises it and lora_B
  random (0.5·randn: nonzero, so that the adapted network differs from the base), saved as diffusers' training
  scripts save it: `StableDiffusionPipeline.save_lora_weights(unet_lora_layers=get_peft_model_state_dict(unet),
  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())`: peft's key names prefixed "unet.", and the
  LoraConfig (lora_alpha 4, so α/r = 2, which the tensors do not carry) in the safetensors metadata.
* `lora/oracle.npz` (float32 unless the name ends in `_f64`; NCHW as torch has it): inputs `z` [2, 4, 8, 8],
  `t` int64 [2], `context` [2, 77, 32] from numpy's default_rng(0); `eps_base` the sd1 unet's ε on them
  without LoRA, `eps_lora` the ε of a freshly loaded sd1 pipeline after `pipe.load_lora_weights(lora/)`, and
  `eps_lora_f64` the same in float64 (a deep copy of that unet, on the float64-cast inputs). The tool checks
  that `eps_lora` equals the ε of the peft-adapted unet it saved (so diffusers read α from the metadata).
  Everything comes from fixed seeds: a rerun writes the same tensors and metadata (safetensors may order the
  header's metadata entries differently, so the bytes can differ).

A second step checks a LoRA file written by idiff (`lora.write`) against diffusers, one step per environment:

    python tools/make_lora_fixture.py write-export DIR
        # idiff's environment: random nonzero adapters (rank 2, alpha 4; the SD targets, proj_in (1×1 conv)
        # and conv1 (3×3 conv)) for sd1's unet, written to DIR/pytorch_lora_weights.safetensors, and the
        # oracle's inputs with idiff's ε of the merged unet in DIR/inputs.npz
    /tmp/torchenv/bin/python tools/make_lora_fixture.py check-export DIR/pytorch_lora_weights.safetensors DIR/inputs.npz
        # loads the file into the sd1 pipeline with pipe.load_lora_weights, prints the largest difference of
        # its ε from idiff's; exits 1 above 1e-4 (ε of order 1; the two libraries agree to ~1e-6 in float32),
        # or when the LoRA changes diffusers' ε by less than 0.1 (the check would then show nothing)
"""

from __future__ import annotations

import copy
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SD1 = ROOT / "tests" / "fixtures" / "sd_tiny" / "sd1"
OUT = ROOT / "tests" / "fixtures" / "sd_tiny" / "lora"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK, ALPHA = 2, 4.0
TOLERANCE = 1e-4


def inputs() -> dict[str, np.ndarray]:
    """Fixed U-Net inputs: z [2, 4, 8, 8] (NCHW), t int64 [2], context [2, 77, 32]."""
    rng = np.random.default_rng(0)
    return {"z": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "t": np.array([999, 17], np.int64),
            "context": rng.standard_normal((2, 77, 32)).astype(np.float32)}


def _eps(unet, arrays, dtype=None) -> np.ndarray:
    import torch

    dtype = dtype or torch.float32
    with torch.no_grad():
        return unet(torch.from_numpy(arrays["z"]).to(dtype), torch.from_numpy(arrays["t"]),
                    torch.from_numpy(arrays["context"]).to(dtype)).sample.numpy()


def _pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(SD1)


def fixture() -> None:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    arrays = inputs()
    pipe = _pipeline()
    eps_base = _eps(pipe.unet, arrays)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    eps_peft = _eps(pipe.unet, arrays)
    OUT.mkdir(exist_ok=True)
    config = pipe.unet.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set: sorted, so that reruns write the same bytes
    StableDiffusionPipeline.save_lora_weights(OUT, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=config)

    fresh = _pipeline()
    fresh.load_lora_weights(OUT)
    eps_lora = _eps(fresh.unet, arrays)
    eps_lora_f64 = _eps(copy.deepcopy(fresh.unet).to(torch.float64), arrays, torch.float64)
    same = np.abs(eps_lora - eps_peft).max()
    effect = np.abs(eps_lora - eps_base).max()
    print(f"|ε(loaded) - ε(peft, saved)| = {same:.2e}; |ε(LoRA) - ε(base)| = {effect:.3f}; "
          f"|ε(LoRA) float32 - float64| = {np.abs(eps_lora - eps_lora_f64).max():.2e}")
    if same > 1e-6 or effect < 0.1:
        sys.exit("the saved LoRA does not reload as saved, or does nothing")
    np.savez(OUT / "oracle.npz", **arrays, eps_base=eps_base, eps_lora=eps_lora, eps_lora_f64=eps_lora_f64)


def write_export(directory: str) -> None:
    import jax
    import jax.numpy as jnp

    from idiff_cli.diffusion import lora
    from idiff_cli.diffusion.pipeline_io import read_pipeline

    pipeline = read_pipeline(SD1)
    params = pipeline.params["unet"]
    # the attention projections (Linear) and, for the layouts of convolutions, the 1×1 proj_in and 3×3 conv1
    spec = lora.LoRASpec(rank=RANK, alpha=ALPHA, targets=lora.SD_TARGETS + ("proj_in", "conv1"))
    adapters = lora.init(jax.random.key(0), params, spec)
    # random up factors (0.5·N(0, 1), as the fixture's lora_B): init's are zeros, which leave the network as it was
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape) if path[-1].key == "up" else x
                                            for (path, x), k in zip(leaves, keys)])
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lora.write(out / lora.LORA_WEIGHTS, adapters, spec.scale)
    arrays = inputs()
    merged = lora.merge(params, adapters, spec.scale)
    eps = pipeline.model.unet.apply(merged, jnp.asarray(arrays["z"].transpose(0, 2, 3, 1)),
                                    jnp.asarray(arrays["t"], jnp.float32), jnp.asarray(arrays["context"]))
    np.savez(out / "inputs.npz", **arrays, eps=np.asarray(eps).transpose(0, 3, 1, 2))
    print(f"wrote {out / lora.LORA_WEIGHTS} and {out / 'inputs.npz'}")


def check_export(file: str, check: str) -> None:
    arrays = dict(np.load(check))
    pipe = _pipeline()
    eps_base = _eps(pipe.unet, arrays)
    pipe.load_lora_weights(str(pathlib.Path(file).parent), weight_name=pathlib.Path(file).name)
    eps = _eps(pipe.unet, arrays)
    difference, effect = np.abs(eps - arrays["eps"]).max(), np.abs(eps - eps_base).max()
    print(f"max |ε(diffusers) - ε(idiff)| = {difference:.2e} (tolerance {TOLERANCE:g}; ε scale "
          f"{np.abs(arrays['eps']).max():.2f}; the LoRA changes diffusers' ε by {effect:.2f})")
    if difference > TOLERANCE or effect < 0.1:
        sys.exit(1)


if __name__ == "__main__":
    commands = {"fixture": (fixture, 0), "write-export": (write_export, 1), "check-export": (check_export, 2)}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or len(sys.argv) != 2 + commands[sys.argv[1]][1]:
        sys.exit(__doc__)
    command, _ = commands[sys.argv[1]]
    command(*sys.argv[2:])
