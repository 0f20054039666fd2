"""Denoising score matching: the exact score has a lower loss than a perturbed one, by more than the
Monte-Carlo error (paired differences, same keys)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli.diffusion.losses import denoising_loss, score_function
from idiff_cli.diffusion.sde import Cosine, OrnsteinUhlenbeck

D = 3
M = jnp.array([0.5, -1.0, 0.2])
SD = jnp.array([0.7, 1.2, 0.4])


def exact_score(sde, shift=0.0, scale=1.0):
    def score(y, t):
        a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        return -scale * (y - a * M - shift) / (a**2 * SD**2 + s**2)

    return score


@pytest.mark.parametrize("sde", [OrnsteinUhlenbeck(), Cosine()], ids=["ou", "cosine"])
@pytest.mark.parametrize("perturbation", [dict(shift=0.2), dict(scale=1.2), dict(scale=0.8)])
def test_exact_score_minimises_the_denoising_loss(sde, perturbation):
    n = 100_000
    x0 = M + SD * jax.random.normal(jax.random.key(0), (n, D))
    key = jax.random.key(1)
    exact = denoising_loss(exact_score(sde), sde, x0, key)
    other = denoising_loss(exact_score(sde, **perturbation), sde, x0, key)
    diff = np.asarray(other - exact)
    assert diff.mean() > 5 * diff.std() / math.sqrt(n)
    # Per example the loss is ‖σ s + ε‖²/d; for the exact score its mean is below that of ε alone (= 1).
    assert float(exact.mean()) < 1.0


def test_score_function_of_a_noise_predictor():
    """A network predicting ε gives s = −ε/σ(t); with ε̂ = the true noise the loss is exactly 0."""
    sde = OrnsteinUhlenbeck()
    apply = lambda params, x, level, labels: params * x  # noqa: E731
    score = score_function(apply, sde)
    x, t = jnp.ones((4, 2, 2, 1)), jnp.array([0.1, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(score(3.0, x, t), -3.0 / sde.sigma(t)[:, None, None, None] * x, rtol=1e-6)


@pytest.mark.parametrize("sde", [OrnsteinUhlenbeck(), Cosine()], ids=["ou", "cosine"])
def test_preconditioned_score_with_a_silent_network_is_exact_for_gaussian_data(sde):
    """With F ≡ 0 the preconditioned ε_θ is the best linear guess σx/v: for data N(0, σ_d² I) that is
    E[ε | X_t = x] exactly, so the score is the true −x/(α²σ_d² + σ²) (float32 rounding, rtol 1e-5)."""
    from idiff_cli.diffusion.losses import DATA_STD

    score = score_function(lambda params, x, level, labels: jnp.zeros_like(x), sde, precondition=True)
    x = jax.random.normal(jax.random.key(0), (5, 2, 2, 1))
    t = jnp.array([0.01, 0.1, 0.5, 0.9, sde.t_max])
    a, s = sde.alpha(t)[:, None, None, None], sde.sigma(t)[:, None, None, None]
    np.testing.assert_allclose(score(None, x, t), -x / (a**2 * DATA_STD**2 + s**2), rtol=1e-5)


def test_preconditioned_network_sees_unit_variance_inputs_and_scaled_outputs():
    """F gets x/√v and its output enters ε_θ times ασ_d/√v (checked with F(u) = u, so ε_θ = (σ/v + ασ_d/v) x)."""
    from idiff_cli.diffusion.losses import DATA_STD

    sde = OrnsteinUhlenbeck()
    score = score_function(lambda params, x, level, labels: x, sde, precondition=True)
    x, t = jnp.ones((3, 1, 1, 1)), jnp.array([0.05, 0.5, 3.0])
    a, s = sde.alpha(t), sde.sigma(t)
    v = a**2 * DATA_STD**2 + s**2
    np.testing.assert_allclose(score(None, x, t)[:, 0, 0, 0], -(s / v + a * DATA_STD / v) / s, rtol=1e-5)
