"""The Inception-v3 FID network: shapes, determinism, its resize against torch's formula, and the
weight file round trip (the equality with pytorch-fid itself is checked by
tools/check_inception_against_pytorch_fid.py, which needs torch: max difference 2.6e-4 on features up to ~200)."""

import jax
import numpy as np
import pytest

from idiff_cli.errors import UserError
from idiff_cli.fid import convert, inception


@pytest.fixture(scope="module")
def network():
    variables = inception.random_variables(0)
    return variables, jax.jit(inception.InceptionV3FID().apply)


def torch_bilinear(images, size):
    """F.interpolate(mode="bilinear", align_corners=False) written out: source = (i + 0.5) * in/out - 0.5,
    clamped at 0, linear weights between the two neighbours (indices clamped at the far edge)."""

    def axis_weights(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        m = np.zeros((size, n_in))
        m[np.arange(size), lo] += 1 - frac
        m[np.arange(size), hi] += frac
        return m

    rows, cols = axis_weights(images.shape[1]), axis_weights(images.shape[2])
    return np.einsum("ih,bhwc,jw->bijc", rows, images, cols, optimize=True)


@pytest.mark.parametrize("in_size", [28, 32, 400])
def test_resize_is_torch_bilinear_without_antialiasing(in_size):
    """Up- and down-sampling to 299 agree with torch's formula to float32 round-off: source coordinates
    up to 400 carry ~400 · 2^-24 ≈ 2.4e-5 error, so 1e-4 on values in [0, 1]."""
    images = np.random.default_rng(0).uniform(size=(2, in_size, in_size, 3)).astype(np.float32)
    ours = np.asarray(inception.resize_bilinear(images))
    np.testing.assert_allclose(ours, torch_bilinear(images.astype(np.float64), 299), atol=1e-4)


@pytest.mark.slow  # compiles Inception-v3
def test_pool_features_have_the_documented_shape_and_are_deterministic(network):
    """[B, H, W, 3] in [0, 1] -> [B, 2048]; the same weights and images give bit-identical features,
    an image's features do not depend on its place in the batch (inference batch norm), up to
    float32 reduction-order round-off (1e-4 relative), and other weights give other features."""
    variables, apply = network
    images = np.random.default_rng(1).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    features = np.asarray(apply(variables, images))
    assert features.shape == (3, inception.FEATURE_DIM) and np.isfinite(features).all()
    assert (features >= 0).all()  # the average of ReLU outputs
    np.testing.assert_array_equal(features, np.asarray(apply(variables, images)))
    permuted = np.asarray(apply(variables, images[[2, 0, 1]]))
    np.testing.assert_allclose(permuted, features[[2, 0, 1]], rtol=1e-4, atol=1e-4 * np.abs(features).max())
    scaled = jax.tree.map(lambda v: 1.1 * v, variables)
    assert not np.allclose(np.asarray(apply(scaled, images)), features)


def torch_named(variables):
    """The inverse of the converter's name map: our variables as a pytorch-fid state dict."""
    from flax.traverse_util import flatten_dict

    state = {}
    for path, value in flatten_dict(variables).items():
        collection, *module, leaf = path
        value, name = np.asarray(value), ".".join(module)
        if leaf == "kernel":
            state[f"{name}.weight"] = np.transpose(value, (3, 2, 0, 1))
        else:
            torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
            state[f"{name}.{torch_leaf}"] = value
            if leaf == "var":
                state[f"{name}.num_batches_tracked"] = np.array(0)
    state["fc.weight"], state["fc.bias"] = np.zeros((1008, 2048)), np.zeros(1008)
    return state


def test_converted_weights_round_trip_and_are_checked(network, tmp_path):
    variables, _ = network
    flat = convert.to_flax(torch_named(variables))
    assert not any(k.startswith("params/fc") for k in flat)
    path = tmp_path / "w.npz"
    np.savez(path, **flat, **{"meta/source_sha256": np.array("0" * 64)})
    loaded = inception.load_weights(path, require_pinned=False)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))
    with pytest.raises(UserError, match="not converted from the pinned pytorch-fid file"):
        inception.load_weights(path)
    del flat["params/Mixed_7c/branch_pool/conv/kernel"]
    np.savez(tmp_path / "short.npz", **flat)
    with pytest.raises(UserError, match="do not fit the FID network"):
        inception.load_weights(tmp_path / "short.npz", require_pinned=False)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="cannot read Inception weights"):
        inception.load_weights(tmp_path / "junk.npz")
    with pytest.raises(UserError, match=r"download .*pt_inception-2015-12-05-6726825d\.pth"):
        inception.load_weights(tmp_path / "absent.npz")


def test_converter_refuses_a_file_that_is_not_the_pinned_one(tmp_path):
    (tmp_path / "other.pth").write_bytes(b"something else")
    with pytest.raises(ValueError, match=convert.PINNED_SHA256):
        convert.convert(tmp_path / "other.pth", tmp_path / "out.npz")
