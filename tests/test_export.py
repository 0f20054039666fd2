"""`idiff export`: a run's network in diffusers' format, the inverse of `idiff import` — the exported
files hold the source's tensors bit for bit (key, shape, layout, dtype) and import again to the same
weights; a finetuned run's θ round-trips in tests/test_import_cli.py. That diffusers itself loads an
export and reproduces idiff's ε is checked by tools/check_export_in_diffusers.py (torch needed)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from helpers import error_line, invoke
from safetensors.numpy import load_file

from idiff_cli.diffusion.model import load

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
DDPM = FIXTURES / "diffusers_tiny" / "model"
SD = FIXTURES / "sd_tiny" / "sd1"


def assert_same_params(a, b) -> None:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_same_tensors(path: pathlib.Path, source: pathlib.Path) -> None:
    exported, original = load_file(str(path)), load_file(str(source))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_an_imported_ddpm_exports_its_source_and_imports_again(tmp_path):
    run, out = tmp_path / "imported", tmp_path / "exported"
    invoke("import", "diffusers", DDPM, "--out", run, check=True)
    assert "exported" in invoke("export", run, "--out", out, check=True).output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                    "scheduler_config.json"]
    assert_same_tensors(out / "diffusion_pytorch_model.safetensors", DDPM / "diffusion_pytorch_model.safetensors")
    for name in ("config.json", "scheduler_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((DDPM / name).read_text())
    invoke("import", "diffusers", out, "--out", tmp_path / "again", check=True)
    assert_same_params(load(tmp_path / "again").params, load(run).params)


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_a_stable_diffusion_run_exports_its_unet(tmp_path, variant):
    run, out = tmp_path / "sd", tmp_path / "exported"
    invoke("import", "diffusers", SD, "--variant", variant, "--out", run, check=True)
    invoke("export", run, "--out", out, check=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == [
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    suffix = ".fp16.safetensors" if variant == "fp16" else ".safetensors"
    assert_same_tensors(out / "unet" / "diffusion_pytorch_model.safetensors",
                        SD / "unet" / f"diffusion_pytorch_model{suffix}")


def test_what_cannot_be_exported_is_one_line_and_writes_nothing(tmp_path):
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    (pretrain / "pretrained.json").write_text("{}")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    cases = [((pretrain, "--out", tmp_path / "a"), "holds idiff's own U-Net (a pretrain run)"),
             ((tmp_path / "nothing", "--out", tmp_path / "a"), "holds no trained model"),
             ((pretrain, "--out", full), "exists and is not an empty directory"),
             ((pretrain,), "missing --out")]
    for args, message in cases:
        assert message in error_line(invoke("export", *args))
    assert not (tmp_path / "a").exists()
