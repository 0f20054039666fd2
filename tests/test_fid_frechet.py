"""The Fréchet distance against closed forms.

All in float64; the tolerances are relative to the scale of the statistics: scipy's sqrtm of a
well-conditioned D <= 64 matrix is accurate to ~1e-10 relative, so 1e-8 leaves margin without
letting a wrong formula through (the closed forms differ from wrong ones by O(1)).
"""

import numpy as np
import pytest

from idiff_cli.fid.frechet import feature_statistics, frechet_distance


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=32), random_spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_a_mean_shift_costs_its_squared_norm():
    rng = np.random.default_rng(1)
    mu, sigma, shift = rng.normal(size=16), random_spd(rng, 16), rng.normal(size=16)
    d = frechet_distance(mu, sigma, mu + shift, sigma)
    np.testing.assert_allclose(d, shift @ shift, rtol=1e-8, atol=1e-8 * np.trace(sigma))


def test_diagonal_covariances_match_the_closed_form():
    """d² = ‖Δμ‖² + Σ_i (√a_i − √b_i)² for Σ1 = diag(a), Σ2 = diag(b)."""
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 24), rng.uniform(0.1, 3, 24)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-10)


def test_distance_is_invariant_to_a_common_rotation():
    """W2 between Gaussians is invariant under x -> Qx: full (non-commuting) covariances give the
    diagonal closed form after rotating both by the same orthogonal Q."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    a, b = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(frechet_distance(np.zeros(20), s1, np.zeros(20), s2), expected, rtol=1e-8)


def test_near_singular_covariances_from_few_samples_give_a_real_finite_value():
    """N = 20 samples in D = 64: rank-19 covariances, the usual FID regime of small sample counts.
    The same features on both sides must give ~0 (the imaginary round-off is dropped)."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(20, 64))
    mu, sigma = feature_statistics(features)
    assert np.linalg.matrix_rank(sigma) == 19
    d = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(d) and abs(d) < 1e-6 * np.trace(sigma)
    other = feature_statistics(rng.normal(size=(20, 64)) + 1.0)
    assert frechet_distance(mu, sigma, *other) > 64 * 0.5  # mean shift of 1 in 64 dims: ~64


def test_broken_statistics_raise_instead_of_returning_a_number():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_are_the_unbiased_float64_moments():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
