"""`idiff evaluate-fid` end to end through the real CLI: given images, saved statistics, a tiny
pretrained run (sampling, fid.json, resuming from kept features), and one-line errors."""

import json

import numpy as np
import pytest
from helpers import error_line, invoke
from PIL import Image

from idiff_cli.data.embedded import mnist_digits


@pytest.fixture(scope="module")
def half_digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "digits.npz"
    np.savez(path, images=mnist_digits()[0][1::2])
    return path


def test_given_images_against_the_embedded_digits_and_against_saved_stats(tmp_path, half_digits):
    """Half of the digits against all of them: small (< 10, see test_fid_features), labelled as the
    classifier FID; saving the reference first and passing it as --ref-stats gives the same number."""
    result = invoke("evaluate-fid", "--samples", half_digits, "--out", tmp_path / "a", check=True)
    fid = json.loads((tmp_path / "a" / "fid.json").read_text())
    assert fid["metric"] == "FID (MNIST classifier features)" and fid["n"] == 2500
    assert 0 < fid["value"] < 10 and fid["reference"] == "dataset mnist"
    assert "FID (MNIST classifier features) = " in result.output
    invoke("evaluate-fid", "--dataset", "mnist", "--save-stats", tmp_path / "ref.npz", check=True)
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["mu"].shape == (128,) and ref["sigma"].shape == (128, 128)
    invoke("evaluate-fid", "--samples", half_digits, "--ref-stats", tmp_path / "ref.npz", "--out", tmp_path / "b", check=True)
    again = json.loads((tmp_path / "b" / "fid.json").read_text())
    assert again["value"] == pytest.approx(fid["value"], rel=1e-9)


def test_npy_and_a_directory_of_pngs_give_the_npz_s_fid(tmp_path, half_digits):
    """The same 300 digits as .npz, .npy ([N, H, W] uint8: one channel) and as 300 PNG files: one FID."""
    with np.load(half_digits) as data:
        digits = data["images"][:300]
    np.savez(tmp_path / "d.npz", images=digits)
    np.save(tmp_path / "d.npy", digits[..., 0])
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(digits):
        Image.fromarray(image[..., 0]).save(tmp_path / "pngs" / f"{i:04d}.png")
    values = []
    for source, out in ((tmp_path / "d.npz", "a"), (tmp_path / "d.npy", "b"), (tmp_path / "pngs", "c")):
        invoke("evaluate-fid", "--samples", source, "--out", tmp_path / out, check=True)
        values.append(json.loads((tmp_path / out / "fid.json").read_text())["value"])
    assert values[1] == values[0] and values[2] == values[0], values


@pytest.mark.parametrize("args, message", [
    (["--samples", "{half}", "--features", "inception"], "no Inception weights given"),
    (["--samples", "{half}", "--features", "inception", "--inception-weights", "{junk}"], "cannot read Inception weights"),
    (["--samples", "{half}", "--ref-stats", "{wrong_dim}"], "holds 2048-d statistics, but the features are 128-d"),
    (["--samples", "{tmp}/absent.npz"], "--samples '"),
    (["--samples", "{tmp}/junk.npz"], "cannot read --samples"),
    (["--samples", "{tmp}/flat.npy"], "images must be [N, H, W, C] with C = 1 or 3, got shape (5, 784)"),
    (["--samples", "{tmp}/bright.npy"], "float images must lie in [-1, 1], got values in [0, 255]"),
    (["--samples", "{tmp}/ints.npy"], "images must be uint8 or float in [-1, 1], got int64"),
    (["--samples", "{tmp}/empty"], "holds no .png files"),
    (["--samples", "{half}", "--features", "nope"], "unknown features 'nope'; valid choices: inception, mnist-classifier"),
    (["--n", "0", "--samples", "{half}"], "--n must be > 0, got 0"),
    (["{tmp}", "--samples", "{half}"], "give RUN_DIR or --samples, not both"),
    (["--dataset", "mnist", "--save-stats", "{tmp}/s.npz", "{tmp}"], "not of a run"),
    ([], "give RUN_DIR, --samples FILE.npz, or --dataset NAME --save-stats FILE.npz"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, half_digits, args, message):
    (tmp_path / "junk.npz").write_bytes(b"not weights")
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.save(tmp_path / "flat.npy", np.zeros((5, 784), np.uint8))
    np.save(tmp_path / "bright.npy", np.full((5, 28, 28, 1), 255.0, np.float32) * np.linspace(0, 1, 5)[:, None, None, None])
    np.save(tmp_path / "ints.npy", np.zeros((5, 28, 28, 1), np.int64))
    (tmp_path / "empty").mkdir()
    names = dict(half=half_digits, junk=tmp_path / "junk.npz", wrong_dim=tmp_path / "wrong.npz", tmp=tmp_path)
    result = invoke("evaluate-fid", *[a.format(**names) for a in args], "--out", tmp_path / "run")
    assert message in error_line(result)
    assert not (tmp_path / "run" / "fid.json").exists()


def test_missing_inception_weights_say_how_to_get_them(half_digits):
    result = invoke("evaluate-fid", "--samples", half_digits, "--features", "inception")
    assert result.exit_code == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in result.output and "python -m idiff_cli.fid.convert" in result.output
