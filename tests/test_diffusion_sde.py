"""Noise processes: closed-form marginals, and the forward SDE simulated from its drift and diffusion
reaches those marginals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli.diffusion.sde import Cosine, OrnsteinUhlenbeck

SDES = [OrnsteinUhlenbeck(), Cosine()]


def test_ou_closed_form():
    sde = OrnsteinUhlenbeck()
    t = np.array([1e-3, 0.1, 1.0, 3.0, 5.0])
    np.testing.assert_allclose(sde.alpha(t), np.exp(-t), rtol=1e-6)
    np.testing.assert_allclose(sde.sigma(t) ** 2, 1 - np.exp(-2 * t), rtol=1e-5)
    np.testing.assert_allclose(sde.diffusion(t), math.sqrt(2), rtol=1e-6)
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(sde.drift(x, 0.7), -x, rtol=1e-6)


def test_cosine_closed_form():
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008 (Nichol & Dhariwal, eq. 17)."""
    sde = Cosine()
    t = np.array([1e-3, 0.1, 0.5, 0.9, 0.99])
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(sde.alpha(t) ** 2, f(t) / f(0.0), rtol=1e-5)
    np.testing.assert_allclose(sde.sigma(t) ** 2, 1 - f(t) / f(0.0), rtol=1e-4)


@pytest.mark.parametrize("sde", SDES, ids=["ou", "cosine"])
def test_drift_and_diffusion_agree_with_the_marginal(sde):
    """For dX = −½β X dt + √β dB: d/dt log α = −½β and α² + σ² = 1."""
    t = jnp.linspace(0.05, 0.95 * sde.t_max, 7)
    dlog_alpha = jax.vmap(jax.grad(lambda s: jnp.log(sde.alpha(s))))(t)
    np.testing.assert_allclose(dlog_alpha, -0.5 * sde.beta(t), rtol=1e-4)
    np.testing.assert_allclose(sde.alpha(t) ** 2 + sde.sigma(t) ** 2, 1.0, rtol=1e-6)
    grid = sde.time_grid(16)
    assert grid[0] == pytest.approx(sde.t_max) and grid[-1] == pytest.approx(sde.t_min)
    assert bool(jnp.all(jnp.diff(grid) < 0))
    draws = sde.sample_time(jax.random.key(0), 1000)
    assert float(draws.min()) >= sde.t_min and float(draws.max()) <= sde.t_max


@pytest.mark.slow  # 40,000 paths × 2,000 steps each
@pytest.mark.parametrize("sde", SDES, ids=["ou", "cosine"])
def test_forward_sde_reaches_the_closed_form_marginal(sde):
    """Euler–Maruyama on dX = f dt + g dB from X_0 ~ N(m0, s0²): mean α m0 and variance α² s0² + σ²,
    checked against 5 standard errors (n = 40,000) plus 0.01 for the O(h) bias of 2,000 steps."""
    n, steps, m0, s0 = 40_000, 2000, 1.5, 0.5
    t_end = 0.5 * sde.t_max
    h = t_end / steps
    x = m0 + s0 * jax.random.normal(jax.random.key(1), (n, 1))

    def body(x, k):
        t = k * h
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(2), k), x.shape)
        return x + sde.drift(x, t) * h + sde.diffusion(t) * math.sqrt(h) * noise, None

    x, _ = jax.lax.scan(body, x, jnp.arange(steps))
    a, s = float(sde.alpha(t_end)), float(sde.sigma(t_end))
    var = a**2 * s0**2 + s**2
    assert abs(float(x.mean()) - a * m0) < 5 * math.sqrt(var / n) + 0.01
    assert abs(float(x.var()) - var) < 5 * var * math.sqrt(2 / n) + 0.01
