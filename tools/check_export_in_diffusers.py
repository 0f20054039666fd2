"""Checks that `idiff export` writes what diffusers loads: the exported directory through diffusers'
own `from_pretrained`, its ε on fixed inputs against idiff's ε of the same run (float32, ~1e-5).

Two steps, one per environment (torch and diffusers are not dependencies of idiff):

    python tools/check_export_in_diffusers.py idiff RUN EXPORT_DIR CHECK.npz
        # idiff's environment: exports RUN into EXPORT_DIR (`idiff export`) and writes fixed inputs and
        # idiff's ε of RUN's network to CHECK.npz
    /tmp/torchenv/bin/python tools/check_export_in_diffusers.py diffusers EXPORT_DIR CHECK.npz
        # torch 2.14.1 + diffusers 0.42.1: loads EXPORT_DIR (UNet2DModel, or unet/ as a
        # UNet2DConditionModel), runs it on the inputs and prints the largest difference from idiff's ε

The second step exits 1 when the difference exceeds 1e-4 (values of order 1; float32 programs of two
libraries agree to ~1e-6 on the tiny fixtures).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np

TOLERANCE = 1e-4


def idiff_side(run: str, export: str, check: str) -> None:
    import jax
    import jax.numpy as jnp

    from idiff_cli.diffusion.model import TextToImageModel, load

    subprocess.run([sys.executable, "-c", "from idiff_cli.cli import main; main()", "export", run, "--out", export],
                   check=True)
    model = load(run)
    rng = np.random.default_rng(0)
    t = np.array([999, 17], np.int64)
    if isinstance(model, TextToImageModel):
        x = rng.standard_normal((2, *model.model.latent_shape)).astype(np.float32)
        context = rng.standard_normal((2, 77, model.model.unet.cross_attention_dim)).astype(np.float32)
        eps = model.model.unet.apply(jax.tree.map(lambda p: p.astype(jnp.float32), model.params["unet"]), x,
                                     t.astype(np.float32), context)
    else:
        x = rng.standard_normal((2, *model.image_shape)).astype(np.float32)
        context = np.zeros((0,), np.float32)
        eps = model.model.apply(model.params, x, t.astype(np.float32))
    np.savez(check, x=np.moveaxis(x, -1, 1), t=t, context=context, eps=np.moveaxis(np.asarray(eps), -1, 1))


def diffusers_side(export: str, check: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel, UNet2DModel

    data = np.load(check)
    root = pathlib.Path(export)
    with torch.no_grad():
        if (root / "unet").is_dir():
            net = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32).eval()
            eps = net(torch.from_numpy(data["x"]), torch.from_numpy(data["t"]),
                      encoder_hidden_states=torch.from_numpy(data["context"])).sample
        else:
            net = UNet2DModel.from_pretrained(root).eval()
            eps = net(torch.from_numpy(data["x"]), torch.from_numpy(data["t"])).sample
    diff = float(np.max(np.abs(eps.numpy() - data["eps"])))
    print(f"{type(net).__name__} from {export}: max |ε_diffusers − ε_idiff| = {diff:.2e} (tolerance {TOLERANCE:g})")
    sys.exit(0 if diff <= TOLERANCE else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["idiff"] and len(sys.argv) == 5:
        idiff_side(*sys.argv[2:])
    elif sys.argv[1:2] == ["diffusers"] and len(sys.argv) == 4:
        diffusers_side(*sys.argv[2:])
    else:
        sys.exit(__doc__)
