"""The offline MNIST-classifier features, the preprocessing, and reference statistics files.

The classifier is trained once per test session into a temporary cache (600 Adam steps, ~10 s on
two idle cores)."""

import dataclasses

import numpy as np
import pytest

from idiff_cli.data.embedded import mnist_digits
from idiff_cli.errors import UserError
from idiff_cli.fid import stats
from idiff_cli.fid.features import embed_all, get_features, to_unit_range
from idiff_cli.fid.frechet import feature_statistics, frechet_distance
from idiff_cli.fid.metric import fid_of_samples
from idiff_cli.images import from_uint8


@pytest.fixture(scope="module")
def mnist_features():
    return get_features("mnist-classifier")


def test_classifier_is_cached_and_accurate(mnist_features):
    """Held-out accuracy on the 1,000 digits it never saw: a working classifier is > 0.9 (measured
    0.947); reloading from the cache gives the same features, bit for bit."""
    assert mnist_features.dim == 128 and mnist_features.label == "FID (MNIST classifier features)"
    accuracy = float(mnist_features.source.split("accuracy ")[1].rstrip(")"))
    assert accuracy > 0.9
    digits = mnist_digits()[0][:64]
    again = get_features("mnist-classifier")
    np.testing.assert_array_equal(embed_all(mnist_features, digits), embed_all(again, digits))


def test_real_vs_real_is_small_and_real_vs_noise_is_large(mnist_features):
    """Two disjoint halves of the digits (2,500 each): measured 2.7; uniform noise: 770; digits shifted
    by 3 pixels: 160. Thresholds 10 and 100 leave a margin of 3.7x and 1.6x-7.7x."""
    digits = mnist_digits()[0]
    even = np.arange(len(digits)) % 2 == 0
    a = feature_statistics(embed_all(mnist_features, digits[even]))
    b = feature_statistics(embed_all(mnist_features, digits[~even]))
    assert frechet_distance(*a, *b) < 10
    noise = np.random.default_rng(0).uniform(-1, 1, (2500, 28, 28, 1)).astype(np.float32)
    assert frechet_distance(*a, *feature_statistics(embed_all(mnist_features, noise))) > 100
    shifted = np.roll(digits[~even], 3, axis=2)
    assert frechet_distance(*a, *feature_statistics(embed_all(mnist_features, shifted))) > 100


def test_fid_of_samples_matches_the_definition(mnist_features):
    """The function for periodic FID: float samples in [-1, 1] are quantised exactly as uint8 images."""
    digits = mnist_digits()[0]
    ref = feature_statistics(embed_all(mnist_features, digits[:1000]))
    as_float = from_uint8(digits[1000:1500])
    value = fid_of_samples(as_float, mnist_features, ref_stats=ref)
    direct = frechet_distance(*feature_statistics(embed_all(mnist_features, digits[1000:1500])), *ref)
    assert value == pytest.approx(direct, rel=1e-9)


def test_preprocessing_quantises_like_a_png():
    x = np.array([-1.0, -0.999, 0.0, 1.0, 2.0], np.float32).reshape(1, 5, 1, 1)
    np.testing.assert_array_equal(to_unit_range(x).ravel() * 255, [0, 0, 128, 255, 255])
    u8 = np.array([0, 7, 255], np.uint8).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(to_unit_range(u8).ravel(), [0, 7 / 255, 1])


def test_wrong_image_size_is_a_one_line_error(mnist_features):
    with pytest.raises(UserError, match="28x28 images, got 32x32"):
        embed_all(mnist_features, np.zeros((2, 32, 32, 3), np.uint8))


def test_stats_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = feature_statistics(rng.normal(size=(40, 8)))
    path = stats.save_stats(tmp_path / "s.npz", mu, sigma, features="test", n=40)
    got_mu, got_sigma = stats.load_stats(path, dim=8)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(UserError, match="8-d statistics, but the features are 2048-d"):
        stats.load_stats(path, dim=2048)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(UserError, match="no 'mu' and 'sigma'"):
        stats.load_stats(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="does not exist"):
        stats.load_stats(tmp_path / "absent.npz")


def test_dataset_statistics_are_computed_once_per_machine_and_keyed_by_their_origin(mnist_features, monkeypatch,
                                                                                    tmp_path):
    """The second run's reference is read from $IDIFF_CACHE_DIR/fid-reference, not recomputed; other
    feature weights (another `source`) get statistics of their own. The statistics are stand-ins that
    number the computations."""
    monkeypatch.setenv("IDIFF_CACHE_DIR", str(tmp_path))
    computed = []

    def numbered(features, images, batch):
        computed.append(len(images))
        return np.full(features.dim, float(len(computed))), np.eye(features.dim)

    monkeypatch.setattr(stats, "image_statistics", numbered)
    first, again = (stats.reference(mnist_features, dataset="mnist") for _ in range(2))
    assert computed == [5000] and first.mu[0] == again.mu[0] == 1.0 and first.description == "dataset mnist"
    retrained = dataclasses.replace(mnist_features, source="other weights")
    assert stats.reference(retrained, dataset="mnist").mu[0] == 2.0
    assert stats.reference(mnist_features, dataset="mnist").mu[0] == 1.0
    assert len(list((tmp_path / "fid-reference").glob("ref-mnist-mnist-classifier-*.npz"))) == 2
