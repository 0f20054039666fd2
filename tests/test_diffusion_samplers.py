"""Samplers with the exact score of a Gaussian target reproduce its mean and covariance.

Target N(m, C) in 2-D with correlated coordinates: p_t = N(α m, α² C + σ² I), so the exact score is
s(y, t) = −(α² C + σ² I)⁻¹ (y − α m). Tolerances: 5 standard errors of n = 20,000 samples (mean:
√(C_ii/n); covariance entry: √((C_ii C_jj + C_ij²)/n)) plus 0.03 for the discretisation bias of the
grid (O(h), 512 steps) and the final denoising step (σ(t_min)² ≤ 0.002).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli import registry
from idiff_cli.diffusion.ddpm import DISCRETE_STEPS, DiscreteDDPM
from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.diffusion.sde import Cosine, OrnsteinUhlenbeck
from idiff_cli.implicit.options import SAMPLERS, STOCHASTIC_SAMPLERS

M = jnp.array([1.0, -0.5])
C = jnp.array([[1.0, 0.6], [0.6, 0.8]])
N_SAMPLES, N_STEPS, BIAS = 20_000, 512, 0.03


def gaussian_score(sde, mean=M, cov=C):
    def score(y, t):  # all rows share one time t[0]
        a, s = sde.alpha(t[0]), sde.sigma(t[0])
        prec = jnp.linalg.inv(a**2 * cov + s**2 * jnp.eye(2))
        return -(y - a * mean) @ prec

    return score


def moments_within_tolerance(x, mean, cov):
    n = x.shape[0]
    m_hat, c_hat = np.mean(x, axis=0), np.cov(x, rowvar=False)
    d = np.sqrt(np.diag(cov))
    mean_tol = 5 * d / math.sqrt(n) + BIAS
    cov_tol = 5 * np.sqrt((np.outer(d**2, d**2) + cov**2) / n) + BIAS
    return bool(np.all(np.abs(m_hat - mean) < mean_tol) and np.all(np.abs(c_hat - cov) < cov_tol))


@pytest.mark.parametrize("sde", [OrnsteinUhlenbeck(), Cosine()], ids=["ou", "cosine"])
@pytest.mark.parametrize("name", ["euler-maruyama", "probability-flow", "ddpm"])
@pytest.mark.slow  # many paths per sampler
def test_exact_score_reproduces_the_target(sde, name):
    sampler = Sampler(sde, N_STEPS, registry.get("sampler", name))
    x = jax.jit(lambda key: sampler.sample(gaussian_score(sde), key, (N_SAMPLES, 2)))(jax.random.key(0))
    assert moments_within_tolerance(np.asarray(x), np.asarray(M), np.asarray(C))
    # The test can fail: a score for another covariance is caught.
    wrong = gaussian_score(sde, cov=1.5 * C)
    x_wrong = jax.jit(lambda key: sampler.sample(wrong, key, (N_SAMPLES, 2)))(jax.random.key(0))
    assert not moments_within_tolerance(np.asarray(x_wrong), np.asarray(M), np.asarray(C))


def test_steps_use_the_given_keys_and_trajectories_are_kept():
    sde = OrnsteinUhlenbeck()
    sampler = Sampler(sde, 8, registry.get("sampler", "euler-maruyama"))
    score = gaussian_score(sde)
    x0, traj = sampler.sample(score, jax.random.key(3), (5, 2), trajectory_every=2)
    assert x0.shape == (5, 2) and traj.shape == (4, 5, 2)
    again = sampler.sample(score, jax.random.key(3), (5, 2))
    np.testing.assert_array_equal(x0, again)
    # Manual stepping with fold_in(step_key, k) is the same trajectory.
    init_key, step_key = jax.random.split(jax.random.key(3))
    y = sampler.init(init_key, (5, 2))
    for k in range(8):
        y = sampler.step(score, y, k, jax.random.fold_in(step_key, k))
    np.testing.assert_allclose(sampler.finalize(score, y), x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, traj[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SAMPLERS)
def test_stochastic_is_whether_the_steps_draw_noise_and_finetune_names_them_alike(name):
    """`Sampler.stochastic` holds exactly for the samplers whose step draws noise (two keys, two outputs), on a
    continuous process and, for ddpm and ddim, on a discrete DDPM chain; finetune's JAX-free --sampler names
    (implicit/options.py) are the registered samplers, grouped the same way."""
    assert sorted(SAMPLERS) == registry.names("sampler")
    samplers = [Sampler(OrnsteinUhlenbeck(), 8, registry.get("sampler", name))]
    if name in DISCRETE_STEPS:
        samplers.append(DiscreteDDPM().sampler(8, name))
    y = jax.random.normal(jax.random.key(0), (3, 2))
    for sampler in samplers:
        one, two = (sampler.step(lambda y_, t_: -y_, y, 0, jax.random.key(i)) for i in (1, 2))
        assert sampler.stochastic == (not np.array_equal(one, two)) == (name in STOCHASTIC_SAMPLERS)
