"""One-off oracle: our Flax Inception port and converter against pytorch-fid itself (not a CI test).

The project does not depend on torch. To run this check, make a separate environment with PyTorch,
torchvision and pytorch-fid, e.g. on this x86_64 machine (pip takes torch from local disk):

    python -m venv /tmp/fidoracle
    /tmp/fidoracle/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid
    python tools/check_inception_against_pytorch_fid.py --torch-python /tmp/fidoracle/bin/python

The torch side builds pytorch-fid's `InceptionV3([3])` (2048-d pool features) with RANDOM weights
(the published file cannot be downloaded here): conv weights from torch's default init, batch-norm
affine parameters randomised and running statistics set from one batch of data (so activations stay
O(1) through the 94 layers), saves the state dict as .pth in both the zip and the legacy format, and
writes the features of random images at 32x32 (upsampled), 28x28 and 400x400 (downsampled) in [0, 1].
This side converts both .pth files with `idiff_cli.fid.convert` (torch-free), runs our network and
prints the largest differences; it also compares the Fréchet distance with pytorch-fid's.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

SIZES = (32, 28, 400)


def torch_side(workdir: pathlib.Path) -> None:
    import torch
    import torch.nn as nn
    from pytorch_fid import fid_score, inception

    torch.manual_seed(0)
    inception.load_state_dict_from_url = lambda *a, **k: None  # no download: keep torch's random init
    load = nn.Module.load_state_dict
    nn.Module.load_state_dict = lambda self, sd, *a, **k: None if sd is None else load(self, sd, *a, **k)
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    nn.Module.load_state_dict = load
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics = the plain average over the calibration batch
            module.reset_running_stats()
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 64, 64, generator=generator))
    model.eval()
    # pytorch-fid's file is the state dict of torchvision's Inception3: the blocks hold its modules in
    # this order (None: the parameter-free max pools and the final average pool).
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None, "Conv2d_3b_1x1", "Conv2d_4a_3x3", None,
             "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c", None]
    modules = [m for block in model.blocks for m in block]
    assert len(modules) == len(names)
    flat = {f"{name}.{key}": value.clone() for name, module in zip(names, modules) if name
            for key, value in module.state_dict().items()}
    flat["fc.weight"] = torch.randn(1008, 2048, generator=generator)  # dropped by the converter
    flat["fc.bias"] = torch.zeros(1008)
    torch.save(flat, workdir / "random_zip.pth")
    torch.save(flat, workdir / "random_legacy.pth", _use_new_zipfile_serialization=False)
    out = {}
    for size in SIZES:
        images = torch.rand(6, 3, size, size, generator=generator)
        with torch.no_grad():
            features = model(images)[0].squeeze(-1).squeeze(-1)
        out[f"images_{size}"] = images.permute(0, 2, 3, 1).numpy()
        out[f"features_{size}"] = features.double().numpy()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 64)), rng.normal(0.3, 1.2, size=(300, 64))
    out["frechet_a"], out["frechet_b"] = a, b
    out["frechet_pytorch_fid"] = np.array(fid_score.calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
    np.savez(workdir / "torch_side.npz", **out)
    print(f"torch {torch.__version__}: wrote {len(flat)} tensors and features for sizes {SIZES}")


def jax_side(torch_python: str) -> None:
    import jax

    from idiff_cli.fid import convert, frechet, inception

    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        subprocess.run([torch_python, __file__, "--torch-side", str(workdir)], check=True)
        ref = np.load(workdir / "torch_side.npz")
        apply = jax.jit(inception.InceptionV3FID().apply)
        for fmt in ("zip", "legacy"):
            convert.convert(workdir / f"random_{fmt}.pth", workdir / f"{fmt}.npz", check_sha256=False)
            variables = inception.load_weights(workdir / f"{fmt}.npz", require_pinned=False)
            for size in SIZES:
                ours = np.asarray(apply(variables, ref[f"images_{size}"]), np.float64)
                theirs = ref[f"features_{size}"]
                err = np.abs(ours - theirs).max()
                print(f"{fmt:>6} .pth, {size:>3}x{size:<3} input: max |ours - pytorch-fid| = {err:.2e} "
                      f"(features up to {np.abs(theirs).max():.2f}, relative {err / np.abs(theirs).max():.1e})")
        a, b = ref["frechet_a"], ref["frechet_b"]
        ours = frechet.frechet_distance(*frechet.feature_statistics(a), *frechet.feature_statistics(b))
        print(f"Fréchet distance: ours {ours:.12f}, pytorch-fid {float(ref['frechet_pytorch_fid']):.12f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=sys.executable, help="a Python with torch and pytorch-fid")
    parser.add_argument("--torch-side", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        torch_side(args.torch_side)
    else:
        jax_side(args.torch_python)
