"""Gradient paths through the sampler against oracles: the 1-D Gaussian case of paper
§4 (closed forms), jax.grad through the unrolled sampler, finite differences, and a small U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.diffusion.samplers import euler_maruyama_step
from idiff_cli.implicit import adjoint, girsanov
from implicit_gaussian import SDE, chain_moments, draw, paths, score, theta

N_STEPS = 32


def test_sampler_output_law_is_pi_star():
    """x_n of the Euler–Maruyama chain ~ N(c_n m, v_n) with c_n, v_n from the exact affine recursion; and
    (c_n m, v_n) → π*(θ) = N(m e^{−t_min}(1 − e^{−2(T − t_min)}), 1) up to the Euler error O(max h).

    Tolerances: 5 standard errors of a mean / variance from 20,000 draws (false-alarm rate < 1e-6);
    the Euler error bound 0.05 is what the recursion gives for 32 steps of the ρ=2 grid (max h ≈ 0.31)."""
    m = 1.5
    with enable_x64(True):
        _, p = paths(N_STEPS, 20_000)
        x = np.asarray(draw(p, theta(m), jax.random.key(0), N_STEPS)[-1, :, 0])
    mean, var = chain_moments(N_STEPS, m)
    n = x.size
    assert abs(x.mean() - mean[-1]) < 5 * np.sqrt(var[-1] / n)
    assert abs(x.var() - var[-1]) < 5 * var[-1] * np.sqrt(2 / n)
    T, t0 = SDE.t_max, SDE.t_min
    assert abs(mean[-1] - m * np.exp(-t0) * (1 - np.exp(-2 * (T - t0)))) < 0.05
    assert abs(var[-1] - 1.0) < 0.05


def test_gamma_is_minus_expected_reward_slope_times_one_minus_exp():
    """Γ for F = −λ E R(x), R = sin, equals −λ mean_b R'(x_n^b) · ∂x_n/∂m exactly (∂x_n/∂m = c_n/m is
    deterministic: the chain is affine in m), and, over the law, −λ E[R'(X)] (1 − e^{−2T}) (paper §4).

    Tolerances: 1e-8 relative for the exact identity (float64 round-off of means over 20,000 draws and
    32 steps; a wrong chain coefficient would be off by > 1e-2); for the law,
    5 standard errors of the batch mean of cos(x) (20,000 draws) plus the Euler error 0.05 · |λ|."""
    m, lam = 0.7, 2.0
    with enable_x64(True):
        _, p = paths(N_STEPS, 20_000)
        key = jax.random.key(1)
        states = draw(p, theta(m), key, N_STEPS)
        grad = adjoint.discrete_adjoint(adjoint.transition(p.step), theta(m), states, key,
                                        lambda q, x, key: -lam * jnp.sin(x[:, 0]))
    mean, var = chain_moments(N_STEPS, 1.0)
    cos_x = np.cos(np.asarray(states[-1, :, 0]))
    np.testing.assert_allclose(float(grad.params["m"]), -lam * cos_x.mean() * mean[-1], rtol=1e-8)
    mu = m * (1 - np.exp(-2 * SDE.t_max))
    closed = -lam * np.cos(mu) * np.exp(-0.5) * (1 - np.exp(-2 * SDE.t_max))  # E cos X, X ~ N(μ, 1)
    assert abs(float(grad.params["m"]) - closed) < 5 * lam * cos_x.std() / np.sqrt(cos_x.size) + 0.05 * lam


def objective_parts(batch=64, c0=1.0):
    """The finetuning objective J = mean[−λ R(x_n)] + β KL_Girsanov on the Gaussian case, x-dependent KL:
    (paths, terminal, running cost, the fused transition of the finetuning runs)."""
    _, p = paths(N_STEPS, batch)
    params0 = theta(0.0, c0)
    cost = girsanov.kl_running_cost(euler_maruyama_step, score, SDE, SDE.time_grid(N_STEPS), params0)
    running = lambda q, x, k: 0.3 * cost(q, x, k)  # noqa: E731
    terminal = lambda q, x, key: -2.0 * jnp.sin(x[:, 0]) + 0.1 * x[:, 0] ** 2
    return p, terminal, running, girsanov.kl_transition(p, SDE, SDE.time_grid(N_STEPS), params0, 0.3)


def test_discrete_adjoint_equals_grad_through_unrolled_sampler_and_finite_differences():
    """Reverse scan of vjps of the fused transition (step and KL increment from one score evaluation)
    == jax.grad through the unrolled scan of the step and the separate running cost (with and without
    jax.checkpoint), relative 1e-6 in float64 (they differ only by summation order), and == central
    finite differences with step 1e-5 (truncation error O(ε²) ≈ 1e-10, round-off ≈ 1e-16/ε ≈ 1e-11)."""
    with enable_x64(True):
        p, terminal, running, fused = objective_parts()
        params, key = theta(0.8, 1.3), jax.random.key(2)
        states = draw(p, params, key, N_STEPS)
        adj = adjoint.discrete_adjoint(fused, params, states, key, terminal)
        for remat in (True, False):
            unrolled = adjoint.unrolled_gradient(adjoint.transition(p.step, running), params, states[0], key, N_STEPS,
                                                 terminal, remat)
            for name in ("m", "c"):
                np.testing.assert_allclose(adj.params[name], unrolled[name], rtol=1e-6)

        def J(q):
            s = draw(p, q, key, N_STEPS)
            return jnp.mean(terminal(q, s[-1], key)) + jnp.mean(girsanov.path_kl(running, q, s))

        eps = 1e-5
        for name in ("m", "c"):
            up, down = dict(params), dict(params)
            up[name], down[name] = params[name] + eps, params[name] - eps
            fd = (J(up) - J(down)) / (2 * eps)
            np.testing.assert_allclose(adj.params[name], fd, rtol=1e-6)
        np.testing.assert_allclose(adj.terminal + adj.running, J(params), rtol=1e-12)


def test_truncated_adjoint_is_grad_with_stopped_early_states():
    """The window first..n of the adjoint (truncated-K) equals jax.grad of the objective with the state
    x_{n−K} held fixed (stop_gradient), relative 1e-6 in float64."""
    K = 5
    with enable_x64(True):
        p, terminal, _, _ = objective_parts()
        params, key = theta(0.8, 1.3), jax.random.key(3)
        states = draw(p, params, key, N_STEPS)
        adj = adjoint.discrete_adjoint(adjoint.transition(p.step), params, states[-K - 1:], key, terminal,
                                       first=N_STEPS - K)

        def J(q):
            s = adjoint.rollout(p.step, q, states[-K - 1], key, K, first=N_STEPS - K)
            return jnp.mean(terminal(q, s[-1], key))

        grad = jax.grad(J)(params)
        for name in ("m", "c"):
            np.testing.assert_allclose(adj.params[name], grad[name], rtol=1e-6)


def test_continuous_adjoint_converges_to_discrete_as_steps_grow():
    """Probability-flow sampler: the continuous adjoint (backward Euler of the Z, A, G system from x_n
    alone) approaches the exact discrete gradient at first order: the gap shrinks at least 2.5× per
    4× refinement (first order would give 4×; 2.5 leaves room for the non-uniform grid), and is below
    5% at 512 steps (measured: 43%, 12%, 3.0% at 32, 128, 512 steps)."""
    gaps = []
    with enable_x64(True):
        params, key = theta(0.8, 1.3), jax.random.key(4)
        terminal = lambda q, x, key: -2.0 * jnp.sin(x[:, 0])
        for n in (32, 128, 512):
            _, p = paths(n, 16, deterministic=True)
            states = draw(p, params, key, n)
            exact = adjoint.discrete_adjoint(adjoint.transition(p.step), params, states, key, terminal).params
            cont = adjoint.continuous_adjoint(p.step, params, states[-1], key, terminal, n).params
            gaps.append(max(abs(float(cont[k] - exact[k])) / abs(float(exact[k])) for k in ("m", "c")))
    assert gaps[0] / gaps[1] > 2.5 and gaps[1] / gaps[2] > 2.5, gaps
    assert gaps[-1] < 0.05, gaps


@pytest.mark.slow  # float64 compilation of a U-Net's VJP; the same identity on the Gaussian problem above is fast
def test_discrete_adjoint_on_a_small_unet_equals_unrolled_grad():
    """The U-Net's score (convolutions of diffusion/conv.py; strided ones are tested in
    test_diffusion_conv.py) through 3 Euler–Maruyama steps on 8×8 images, reward on the Tweedie-denoised output plus a Girsanov KL to other weights θ0:
    the adjoint of the fused transition == jax.grad through the unrolled sampler with the step and the
    KL increment evaluated separately, float64. Tolerance: max |difference| over
    all leaves below 1e-8 × the largest gradient entry (leaves whose true gradient is 0, e.g. attention
    key biases, carry round-off only, so a per-leaf relative test would divide 1e-17 by 1e-17).
    Parameters are drawn with numpy: flax's initialisers take ~30 s to compile on this CPU."""
    from idiff_cli.diffusion.losses import score_function
    from idiff_cli.diffusion.samplers import Sampler
    from idiff_cli.diffusion.unet import UNet
    from idiff_cli.implicit.paths import sampler_paths

    with enable_x64(True):
        net = UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), groups=2)
        x = jnp.zeros((2, 8, 8, 1))
        rng = np.random.default_rng(0)
        shapes = jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(2))
        params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape)), shapes)
        sc = score_function(lambda q, x, level, labels: net.apply(q, x, level, labels), SDE)
        p = sampler_paths(Sampler(SDE, 3), sc, (2, 8, 8, 1))
        key = jax.random.key(5)
        terminal = lambda q, x, key: -jnp.mean(p.denoise(q, x), axis=(1, 2, 3))
        params0, grid = jax.tree.map(lambda v: 0.8 * v, params), SDE.time_grid(3)
        running = lambda q, x, k: 0.5 * girsanov.kl_running_cost(euler_maruyama_step, sc, SDE, grid, params0)(q, x, k)
        states = draw(p, params, key, 3)
        fused = girsanov.kl_transition(p, SDE, grid, params0, 0.5)
        adj = adjoint.discrete_adjoint(fused, params, states, key, terminal)
        assert float(adj.running) > 1e-3  # the KL term is really there
        ref = adjoint.unrolled_gradient(adjoint.transition(p.step, running), params, states[0], key, 3, terminal,
                                        remat=False)
        adj = adj.params
        a, b = jax.tree.leaves(adj), jax.tree.leaves(ref)
        scale = max(float(jnp.max(jnp.abs(v))) for v in b)
        assert scale > 1e-3
        assert max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(a, b)) < 1e-8 * scale
