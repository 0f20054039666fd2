"""Girsanov KL(p ‖ π*(θ0)) against the closed-form KL of two Gaussian OU paths."""

import jax
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.implicit import adjoint, girsanov
from implicit_gaussian import SDE, chain_joint, draw, gaussian_kl, paths, score, theta

N_STEPS, BATCH = 16, 20_000
THETA, THETA0 = (0.8, 1.4), (0.0, 1.0)  # (m, c): the drift difference depends on x


def closed_form_kl(m, c):
    """KL between the laws of the whole discrete paths (x_0..x_n) of the θ and θ0 chains: two
    (n+1)-dimensional Gaussians (the chains are affine in x)."""
    return gaussian_kl(*chain_joint(N_STEPS, m, c), *chain_joint(N_STEPS, *THETA0))


def test_girsanov_estimate_equals_closed_form_path_kl():
    """The batch mean of the Girsanov sums is within 5 standard errors (20,000 paths) of the exact
    path KL (a wrong factor ½ or g² would be off by many standard errors)."""
    with enable_x64(True):
        _, p = paths(N_STEPS, BATCH)
        running = girsanov.kl_running_cost(score, SDE, SDE.time_grid(N_STEPS), theta(*THETA0))
        states = draw(p, theta(*THETA), jax.random.key(0), N_STEPS)
        kl = np.asarray(girsanov.path_kl(running, theta(*THETA), states))
    exact = closed_form_kl(*THETA)
    assert 0.1 < exact
    assert abs(kl.mean() - exact) < 5 * kl.std() / np.sqrt(kl.size), (kl.mean(), exact)


def test_girsanov_gradient_through_the_adjoint_equals_closed_form_gradient():
    """d KL / dθ from the adjoint (Girsanov sum as running cost, states moving with θ) vs the derivative
    of the closed form (central differences, step 1e-5): within 5 standard errors estimated from 20
    independent sub-batches of 1,000 paths."""
    with enable_x64(True):
        _, p = paths(N_STEPS, 1000)
        kl = girsanov.kl_transition(p, score, SDE, SDE.time_grid(N_STEPS), theta(*THETA0), 1.0)
        zero = lambda q, x: 0.0 * x[:, 0]
        gradient = jax.jit(lambda key: adjoint.discrete_adjoint(
            kl, theta(*THETA), draw(p, theta(*THETA), key, N_STEPS), key, zero).params)
        grads = [gradient(jax.random.key(i)) for i in range(20)]
    for name, index in (("m", 0), ("c", 1)):
        g = np.array([float(gr[name]) for gr in grads])
        up, down = list(THETA), list(THETA)
        up[index] += 1e-5
        down[index] -= 1e-5
        exact = (closed_form_kl(*up) - closed_form_kl(*down)) / 2e-5
        assert abs(g.mean() - exact) < 5 * g.std() / np.sqrt(g.size), (name, g.mean(), exact)


def test_kl_transition_needs_a_step_that_evaluates_the_score_once_at_x():
    """The fused transition reuses the step's score evaluation as sθ(x_k, t_k); a step that evaluates
    the score elsewhere (here also at x + h s, a Heun-like predictor) is refused, not silently mixed."""
    from idiff_cli.diffusion.samplers import Sampler
    from idiff_cli.implicit.paths import sampler_paths

    def heun_like(sde, score, y, t, t_next, key):
        tb = jax.numpy.full(y.shape[:1], t)
        return y + score(y + (t - t_next) * score(y, tb), tb) * (t - t_next)

    p = sampler_paths(Sampler(SDE, 4, heun_like, denoise_final=False), score, (3, 1))
    kl = girsanov.kl_transition(p, score, SDE, SDE.time_grid(4), theta(*THETA0, dtype=jax.numpy.float32), 1.0)
    with pytest.raises(ValueError, match="heun_like evaluated it 2 times"):
        kl(theta(*THETA, dtype=jax.numpy.float32), jax.numpy.zeros((3, 1)), 0, jax.random.key(0))
