"""`--method ddpo` (implicit/ddpo.py) against closed forms on the paper's 1-D Gaussian case (§4).

The Euler–Maruyama chain of the score −c (x − m e^{−t}) is affine-Gaussian: step k maps x to
N(a_k x + b_k, s_k²) with a_k = 1 + h_k (1 − 2c), b_k = 2 c m h_k e^{−t_k}, s_k² = 2 h_k
(tests/implicit_gaussian.py). So E[R(x_n)] for R = sin is sin(μ_n) e^{−v_n/2} with the chain's mean μ_n
and variance v_n, the per-step KLs to θ0 are quadratics in x_k, and `jax.grad` of these closed forms
gives the gradients DDPO's estimates must match. Float64 throughout (`enable_x64`), as the other
Gaussian oracles.

Tolerance of the statistical checks: k = 5 standard errors of the mean of G = 50 independent batch
gradients (the method's own batches, slot keys fold_in(root, i)), the SE from their spread. For a
Gaussian mean a 5 SE miss has probability 6e-7 per component; the SE itself is estimated from 50
batches (±10 %), which 5 leaves room for."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.implicit import ddpo, finetune, methods
from idiff_cli.implicit.ppo import PPO
from implicit_gaussian import SDE, chain_moments, draw, path_kl, paths, theta

T, B, G = 4, 4000, 50
THETA, THETA0 = (0.8, 1.3), (0.5, 1.0)
LAM = 2.0
K_SE = 5.0
RAW = PPO("raw", 1e9, 1)  # raw advantages, one inner epoch, a clip range that never binds


def reward(x):
    return jnp.sin(x[:, 0])


def per_step_law(ms, cs):
    """(means [T + 1], variances [T + 1]) of x_0..x_T when step k uses θ_k = (ms[k], cs[k]) (jnp)."""
    grid = SDE.time_grid(T).astype(jnp.float64)
    h = grid[:-1] - grid[1:]
    mean, var = [jnp.zeros(())], [jnp.ones(())]
    for k in range(T):
        a, b = 1 + h[k] * (1 - 2 * cs[k]), 2 * cs[k] * ms[k] * h[k] * jnp.exp(-grid[k])
        mean.append(a * mean[-1] + b)
        var.append(a**2 * var[-1] + 2 * h[k])
    return jnp.stack(mean), jnp.stack(var)


def expected_reward(ms, cs):
    """E[sin x_T] = sin(μ_T) e^{−v_T/2}."""
    mean, var = per_step_law(ms, cs)
    return jnp.sin(mean[-1]) * jnp.exp(-var[-1] / 2)


def per_step(m, c):
    return jnp.full(T, m), jnp.full(T, c)


def expected_kl(theta_, theta_law):
    """Σ_k E_{x_k ∼ law of θ_law} [(Δa_k x + Δb_k)²/(2 s_k²)], the per-step KLs of the θ_-chain to θ0's."""
    grid = SDE.time_grid(T).astype(jnp.float64)
    h = grid[:-1] - grid[1:]
    mean, var = per_step_law(*per_step(*theta_law))
    (m, c), (m0, c0) = theta_, THETA0
    da = h * (1 - 2 * c) - h * (1 - 2 * c0)
    db = 2 * h * jnp.exp(-grid[:-1]) * (c * m - c0 * m0)
    second = var[:-1] + mean[:-1] ** 2
    return jnp.sum((da**2 * second + 2 * da * db * mean[:-1] + db**2) / (4 * h))


def batch_gradients(problem, params, ppo=RAW, n=G):
    """The ddpo estimates of n successive outer steps at fixed θ (each samples a new batch: E = 1):
    [n, 2] (m, c components)."""
    method = methods.make_method("ddpo", problem, T, 1, ppo=ppo)
    carry = method.init(params, jax.random.key(11))
    estimate = jax.jit(lambda carry: method.estimate(params, carry, None))
    rows = []
    for _ in range(n):
        carry, est = estimate(carry)
        rows.append([float(est.grad["m"]), float(est.grad["c"])])
    return np.array(rows)


def gaussian_problem(lam, beta, policy_of=lambda policy: policy):
    _, p = paths(T, B)
    problem = finetune.bind_problem(p, SDE, SDE.time_grid(T), reward, bool(beta))(theta(*THETA0), lam, beta)
    return dataclasses.replace(problem, policy=policy_of(problem.policy))


def holding(differentiated):
    """policy -> the policy whose mean at step k is held (stop-gradient) unless differentiated(k): the
    log-probability terms of the held steps leave the gradient."""
    def policy_of(policy):
        def moments(params, x, k, slot_key):
            mean, std, kl = policy.moments(params, x, k, slot_key)
            return jnp.where(differentiated(k), mean, jax.lax.stop_gradient(mean)), std, kl
        return policy._replace(moments=moments)
    return policy_of


def mean_and_se(rows):
    return rows.mean(0), rows.std(0, ddof=1) / np.sqrt(len(rows))


def test_closed_forms_agree_with_the_shared_gaussian_helpers():
    """The jnp closed forms used below against implicit_gaussian's numpy ones: the chain's mean and
    variance, and the sum of per-step KLs = the KL between the two whole-path Gaussians (chain rule)."""
    with enable_x64(True):
        mean, var = per_step_law(*per_step(*THETA))
        kl = float(expected_kl(THETA, THETA))
    np.testing.assert_allclose(np.stack([mean, var]), np.stack(chain_moments(T, *THETA)), rtol=1e-6)
    np.testing.assert_allclose(kl, path_kl(T, THETA, THETA0), rtol=1e-6)


def test_score_function_gradient_matches_the_closed_form_gradient():
    """Raw advantages, one inner epoch, no clipping, β = 0: the mean over 50 batches of 4,000 paths of
    ddpo's gradient of F = −λ E sin(x_T) equals −λ ∇_(m, c) E[sin x_T] from the chain's Gaussian law,
    within 5 SE per component (module docstring). Both components are > 40 SE from 0, so a sign error
    misses by > 80 SE. Negative controls: with any one step's log-probability term left out, the
    estimate misses the closed form by > 5 SE in some component (the step's closed-form share, from a
    per-step θ_k, being > 10 SE)."""
    with enable_x64(True):
        closed = -LAM * np.array(jax.grad(lambda m, c: expected_reward(*per_step(m, c)), (0, 1))(*THETA))
        shares = -LAM * np.stack(jax.grad(expected_reward, (0, 1))(*per_step(*THETA)), 1)  # [T, 2]
        mean, se = mean_and_se(batch_gradients(gaussian_problem(LAM, 0.0), theta(*THETA)))
        dropped = [mean_and_se(batch_gradients(gaussian_problem(LAM, 0.0, holding(lambda k, j=j: k != j)), theta(*THETA)))[0]
                   for j in range(T)]
    np.testing.assert_allclose(shares.sum(0), closed, rtol=1e-10)
    assert np.all(np.abs(mean - closed) < K_SE * se), (mean, closed, se)
    assert np.all(np.abs(closed) > 40 * se), (closed, se)
    for j in range(T):
        assert np.max(np.abs(shares[j]) / se) > 10, (j, shares[j], se)
        assert np.max(np.abs(dropped[j] - closed) / se) > K_SE, (j, dropped[j], closed, se)
        # and what is left is the other steps' share
        assert np.all(np.abs(dropped[j] - (closed - shares[j])) < K_SE * se), (j, dropped[j], se)


def test_kl_gradient_is_the_pathwise_part_at_the_sampled_states():
    """λ = 0, β = 1, θ ≠ θ0 (c ≠ c0: the KL increments depend on x_k): ddpo's gradient is
    Σ_k E[∇_θ KL_k(θ; x_k)] with the law of x_k held at θ's (ddpo.py: the pathwise part), within 5 SE.
    The full gradient of the path KL, which adds the score-function part, is > 5 SE away: the part left
    out is real, and the estimate is not it."""
    with enable_x64(True):
        pathwise = np.array(jax.grad(lambda m, c: expected_kl((m, c), THETA), (0, 1))(*THETA))
        full = np.array(jax.grad(lambda m, c: expected_kl((m, c), (m, c)), (0, 1))(*THETA))
        mean, se = mean_and_se(batch_gradients(gaussian_problem(0.0, 1.0), theta(*THETA)))
    assert np.all(np.abs(mean - pathwise) < K_SE * se), (mean, pathwise, se)
    assert np.max(np.abs(mean - full) / se) > K_SE, (mean, full, se)


def test_a_batch_serves_inner_epochs_updates_then_the_next_slot_is_sampled():
    """E = 2: step 0 samples the path of slot key fold_in(root, 0) under θ; step 1 updates on the same
    states (no new slot) with ratios to the stored old means, which at an unchanged θ are 1: the same
    gradient (float64 rounding of two programs); step 2 samples slot 1 under the θ it is given."""
    with enable_x64(True):
        problem = gaussian_problem(LAM, 0.3)
        method = methods.make_method("ddpo", problem, T, 1, ppo=PPO("normalized", 0.2, 2))
        root = jax.random.key(5)
        carry = method.init(theta(*THETA0), root)
        step = jax.jit(lambda params, carry: method.estimate(params, carry, None))
        carry, first = step(theta(*THETA), carry)
        carry, second = step(theta(*THETA), carry)
        carry, third = step(theta(*THETA0), carry)
        for est, slot, params in ((first, 0, THETA), (third, 1, THETA0)):
            key = jax.random.fold_in(root, slot)
            np.testing.assert_array_equal(est.states, draw(problem.paths, theta(*params), key, T))
        np.testing.assert_array_equal(second.states, first.states)
        for name in ("m", "c"):
            np.testing.assert_allclose(second.grad[name], first.grad[name], rtol=1e-12)
        assert int(carry[0]) == 2


def test_off_policy_updates_are_clipped():
    """An update on a batch sampled under θ0 at θ ≠ θ0 (not fresh: ratios to the stored old means). With
    ε = 1e-9 every ratio lies outside [1 − ε, 1 + ε], and PPO's min keeps a path's step k only when its
    ratio moved against the advantage, (ρ − 1) A < 0: the clipped gradient over 16 paths equals the sum
    of the unclipped (ε = 1e9) gradients of those (path, step) pairs alone, each from a one-path batch with
    the other steps' means held, / 16 (float64, rtol 1e-9). Some pairs are kept and some not."""
    n = 16
    with enable_x64(True):
        problem = gaussian_problem(LAM, 0.0)
        policy = problem.policy
        key = jax.random.key(2)  # the policy's unconditional score does not read the slot key
        states = draw(problem.paths, theta(*THETA0), key, T)[:, :n]
        ks = jnp.arange(T)
        old, std = jax.vmap(lambda x, k: policy.moments(theta(*THETA0), x, k, key)[:2])(states[:-1], ks)
        new = jax.vmap(lambda x, k: policy.moments(theta(*THETA), x, k, key)[0])(states[:-1], ks)
        adv = ddpo.advantages(reward(states[-1]), "normalized", LAM)
        rho = np.exp(np.asarray(jax.vmap(ddpo.log_ratio)(states[1:], new, old, std)))  # [T, n]

        @jax.jit
        def gradient(eps, batch, keep):
            held = holding(lambda k: (keep < 0) | (k == keep))(policy)
            g, _ = ddpo.policy_gradient(held, theta(*THETA), batch, jnp.asarray(False), eps)
            return jnp.stack([g["m"], g["c"]])

        clipped = gradient(1e-9, ddpo.Batch(states, old, adv, states[-1], key), -1)
        kept = [(i, k) for i in range(n) for k in range(T) if (rho[k, i] - 1) * float(adv[i]) < 0]
        expected = sum(gradient(1e9, ddpo.Batch(states[:, i:i + 1], old[:, i:i + 1], adv[i:i + 1],
                                                states[-1, i:i + 1], key), k) for i, k in kept) / n
    assert 0 < len(kept) < n * T, len(kept)
    np.testing.assert_allclose(clipped, expected, rtol=1e-9)


def test_log_ratio_is_the_difference_of_gaussian_log_probabilities():
    """log_ratio(x', m, m_old, σ) = log N(x'; m, σ²) − log N(x'; m_old, σ²) (float64, to 1e-10 of the
    log-probabilities' size), exactly 0 at m = m_old, and 0 for a step without noise (σ = 0)."""
    with enable_x64(True):
        kx, km, ko = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (3, 4, 4, 1), jnp.float64)
        mean = x + 0.3 * jax.random.normal(km, x.shape, jnp.float64)
        old = mean + 0.05 * jax.random.normal(ko, x.shape, jnp.float64)
        std = jnp.asarray([0.5, 0.7, 1.1])
        got = ddpo.log_ratio(x, mean, old, std)
        want = ddpo.gaussian_log_prob(x, mean, std) - ddpo.gaussian_log_prob(x, old, std)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(want))) + 1e-12)
        assert float(jnp.max(jnp.abs(got))) > 0.1
        np.testing.assert_array_equal(ddpo.log_ratio(x, mean, mean, std), 0.0)
        np.testing.assert_array_equal(ddpo.log_ratio(x, mean, old, jnp.asarray([0.0, 0.7, 0.0])) == 0.0,
                                      [True, False, True])


@pytest.mark.parametrize("lam", [2.0, -0.5])
def test_normalized_advantages_have_mean_0_and_std_lambda(lam):
    """normalized: λ (R − mean R)/(std R + 1e-8) has batch mean 0 and std |λ|, its sign ordering that
    of λ R; raw: λ R."""
    r = jnp.asarray([0.1, 0.4, -0.3, 0.9])
    a = np.asarray(ddpo.advantages(r, "normalized", lam))
    np.testing.assert_allclose([a.mean(), a.std()], [0.0, abs(lam)], atol=1e-6)
    assert np.all(np.argsort(a) == np.argsort(lam * np.asarray(r)))
    np.testing.assert_allclose(ddpo.advantages(r, "raw", lam), lam * r)
