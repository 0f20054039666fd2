"""ULA at fixed θ reaches π*(θ): moments against the exact mixture moments (paper §2.2, eq. 3-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli import registry
from idiff_cli.langevin.ula import ula_chain


@pytest.mark.slow  # 10,000 chains × 3,000 steps
def test_ula_reaches_the_gibbs_measure():
    """From p0 = N(0, I), 3,000 ULA steps of γ = 0.01 (time 30, many mixing times for the unit
    hexagon) give the mixture's mean and covariance.

    Tolerance per entry: 5 standard errors for N = 10,000 independent chains, plus γ for the ULA
    bias (for a Gaussian of variance v, ULA's stationary variance is v/(1 − γ/2v) ≈ v + γ/2).
    """
    potential = registry.get("potential", "hexagon-paper")
    theta = jnp.array([2.5, 1.0, 0.0, -1.0, 0.0, 1.0])  # uneven weights: the target is off-centre
    n, gamma = 10_000, 0.01
    x0 = jax.random.normal(jax.random.key(0), (2, n))
    x = jax.jit(lambda x: ula_chain(lambda y: potential(y, theta), x, jax.random.key(1), gamma, 3000))(x0)

    w = np.asarray(jax.nn.softmax(theta))
    c = np.asarray(potential.centres)
    mean = w @ c
    cov = potential.scale**2 * np.eye(2) + (c * w[:, None]).T @ c - np.outer(mean, mean)

    x = np.asarray(x)
    got_mean, got_cov = x.mean(1), np.cov(x)
    se_mean = np.sqrt(np.diag(cov) / n)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)  # Gaussian approximation
    assert np.all(np.abs(got_mean - mean) <= 5 * se_mean + gamma), (got_mean, mean)
    assert np.all(np.abs(got_cov - cov) <= 5 * se_cov + gamma), (got_cov, cov)
    # The initial law is far from the target in these statistics, so the test has power.
    assert np.abs(np.asarray(x0).mean(1) - mean).max() > 10 * (5 * se_mean.max() + gamma)
