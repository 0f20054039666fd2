"""Γ_ref, the quadrature metrics and the EBM methods against oracles (paper §3.2, Appendix A.1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idiff_cli import registry
from idiff_cli.ebm import metrics, toy_data
from idiff_cli.langevin import quadrature
from idiff_cli.langevin.estimators import reference_gradient, reward_gradient
from idiff_cli.langevin.methods import (REFERENCE_STREAM, Components, add, covariance, reference,
                                        scaled)
from idiff_cli.langevin.ula import ula_chain

WELLS = registry.get("potential", "seven-wells")
THETA_STAR = jnp.asarray(toy_data.THETA_TARGET)
TARGET = toy_data.get("wells")


def exact_kl_gradient(theta, grid=metrics.GRID):
    """∇θ KL(π_target ‖ π*(θ)) by jax.grad through the quadrature KL."""
    log_p = TARGET.log_density(grid.points())

    def kl(th):
        neg_v = -WELLS(grid.points(), th)
        return metrics.kl(log_p, neg_v - jax.nn.logsumexp(neg_v) - 2 * math.log(grid.spacing), grid)

    return jax.grad(kl)(theta)


def gamma_ref_and_stderr(theta, n, key):
    """Γ_ref from n exact target draws and n exact draws of π*(θ), with its per-coordinate standard error."""
    k_ref, k_model = jax.random.split(key)
    x_ref, x = TARGET.sample(k_ref, n), WELLS.sample(k_model, theta, n)
    estimate = reference_gradient(WELLS, x, x_ref, theta)
    grad_v = jax.vmap(jax.grad(lambda xi, th: WELLS(xi, th), argnums=1), in_axes=(1, None))
    stderr = jnp.sqrt(jnp.var(grad_v(x_ref, theta), 0) / n + jnp.var(grad_v(x, theta), 0) / n)
    return estimate, stderr


def test_reference_gradient_matches_the_exact_gradient_of_the_kl():
    """Γ_ref(π*(θ), θ) = ∇θ KL(π_target ‖ π*(θ)) (§3.2), θ half-way between θ0 and θ*.

    Oracle: jax.grad of the KL computed by quadrature (grid h = 0.2, error ≪ 1e-6 for unit-variance
    wells). Tolerance: 5 standard errors of the two independent sample means (n = 100,000 each).
    """
    theta = jnp.array([-2.0, -3.0, -1.0, -3.5, 0.0, -2.5, 4.0])
    exact = exact_kl_gradient(theta)
    estimate, stderr = gamma_ref_and_stderr(theta, 100_000, jax.random.key(0))
    assert jnp.all(jnp.abs(estimate - exact) <= 5 * stderr + 1e-6), (estimate, exact, stderr)
    assert float(jnp.linalg.norm(exact)) > 20 * float(jnp.linalg.norm(stderr))  # the test has power


def test_reference_gradient_vanishes_at_the_target():
    """At θ = θ*, ∇KL = 0 exactly (quadrature: < 1e-6) and Γ_ref is within 5 standard errors of 0."""
    assert float(jnp.abs(exact_kl_gradient(THETA_STAR)).max()) < 1e-6
    estimate, stderr = gamma_ref_and_stderr(THETA_STAR, 100_000, jax.random.key(1))
    assert jnp.all(jnp.abs(estimate) <= 5 * stderr), (estimate, stderr)


def test_quadrature_kl_against_a_finer_float64_grid_and_closed_forms():
    """The metric grid (h = 0.2 on [−10, 10]²) against h = 0.05 in float64: |ΔKL| < 1e-5 both ways.

    Plus closed forms: KL(p ‖ p) = 0 and, between unit Gaussians at distance δ, δ²/2.
    """
    theta0 = jnp.array([-7.0] * 6 + [11.0])
    fine = quadrature.Grid(-9.975, 9.975, 400)
    with jax.enable_x64(True):
        def both(grid, dtype):
            log_p = TARGET.log_density(grid.points().astype(dtype))
            neg_v = -WELLS(grid.points().astype(dtype), theta0.astype(dtype))
            log_q = neg_v - jax.nn.logsumexp(neg_v) - 2 * math.log(grid.spacing)
            return np.array([metrics.kl(log_p, log_q, grid), metrics.kl(log_q, log_p, grid)])

        reference = both(fine, jnp.float64)
    got = both(metrics.GRID, jnp.float32)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)
    assert reference[0] > 5  # θ0 is far from θ*: the values checked are not trivially 0

    unit = registry.get("potential", "hexagon")  # wells of unit variance: one well is N(c, I)
    x = metrics.GRID.points()
    # Logit 200: the other wells weigh e^−200, negligible everywhere in the box (with 50, they would
    # dominate q beyond x1 = 6 and the KL would be 31.96).
    log_a = unit.log_density(x, jnp.array([200.0, 0, 0, 0, 0, 0]))  # all mass on (4, 0)
    log_b = unit.log_density(x, jnp.array([0, 0, 0, 200.0, 0, 0]))  # all mass on (−4, 0)
    assert abs(float(metrics.kl(log_a, log_a))) < 1e-6
    assert abs(float(metrics.kl(log_a, log_b)) - 8.0 ** 2 / 2) < 1e-3


def test_histogram_kl_is_small_for_exact_draws_and_large_for_wrong_ones():
    """Exact draws: the plug-in bias (m − 1)/(2B) ≈ 60/(2·10⁵) plus noise stays < 0.01; draws of
    N(0, I) (the initial model) against the target: > 1 (KL(p_data ‖ p0) at bin level is ≈ 5)."""
    neg_v = -WELLS(metrics.GRID.points(), THETA_STAR)
    log_q = neg_v - jax.nn.logsumexp(neg_v) - 2 * math.log(metrics.GRID.spacing)
    exact = TARGET.sample(jax.random.key(2), 100_000)
    wrong = jax.random.normal(jax.random.key(3), (2, 100_000))
    assert float(metrics.histogram_kl(exact, log_q)) < 0.01
    assert float(metrics.histogram_kl(wrong, log_q)) > 1.0
    np.testing.assert_allclose(float(metrics.bin_masses(log_q).sum()), 1.0, atol=1e-5)


def test_mlp_energy_starts_as_the_base_gaussian():
    """With its zero output layer, π*(θ_init) = N(0, s0² I): the quadrature NLL of held-out points
    equals the closed form. Tolerance 5e-3: the box [−10, 10]² misses 2Φ(−10/3) ≈ 9e-4 of the mass
    per coordinate (log Z is low by ≈ 1.7e-3)."""
    energy = registry.get("energy", "mlp")
    params = energy.init(jax.random.key(0))
    evaluate = metrics.make_evaluator(energy, TARGET, TARGET.sample(jax.random.key(4), 5000))
    x_test = TARGET.sample(jax.random.key(4), 5000)
    nll = float(evaluate(jax.tree.map(lambda a: a[None], params), jnp.zeros((1, 2, 10)), jax.random.split(jax.random.key(5), 1))["nll"][0])
    s0 = energy.base_scale
    closed = float(jnp.mean(jnp.sum(x_test**2, 0)) / (2 * s0**2) + math.log(2 * math.pi * s0**2))
    assert abs(nll - closed) < 5e-3, (nll, closed)


def _components(reward=None, beta=0.0, reference_draw=lambda k: TARGET.sample(k, 64)):
    """Γ_ref towards the target (reward None), or Γ_reward (+ β Γ_ref towards `reference_draw`)."""
    penalty = scaled(beta, reference(WELLS, reference_draw)) if beta else None
    gradient = reference(WELLS, reference_draw) if reward is None else add(covariance(WELLS, reward), penalty)
    return Components(WELLS, reward, 0.2, 0.0, lambda scale: optax.sgd(0.1 * scale), gradient, penalty)


def _run_steps(method, theta, n_steps=5, x0=None):
    update = jax.jit(method.update)
    state = method.init(jax.random.normal(jax.random.key(6), (2, 64)) if x0 is None else x0, theta)
    for k in range(n_steps):
        state = update(state, jax.random.fold_in(jax.random.key(7), k))
    return state


def test_nested_with_one_inner_step_is_implicit_and_short_run_forgets_the_chains():
    """Same keys: nested T = 1 with Γ_ref is Implicit Diffusion bit for bit; short-run chains
    restart from N(0, I), so their state after a step does not depend on the chains before it."""
    theta = jnp.array([-7.0] * 6 + [11.0])
    c = _components()
    a = _run_steps(registry.get("method", "implicit")(c, 1), theta)
    b = _run_steps(registry.get("method", "nested")(c, 1), theta)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.theta, theta)

    short = registry.get("method", "short-run")(c, 3)
    s1 = _run_steps(short, theta, 1, jnp.zeros((2, 64)))
    s2 = _run_steps(short, theta, 1, jnp.full((2, 64), 5.0))
    np.testing.assert_array_equal(s1.x, s2.x)
    np.testing.assert_array_equal(s1.theta, s2.theta)
    nested = _run_steps(registry.get("method", "nested")(c, 3), theta, 1, jnp.full((2, 64), 5.0))
    assert not np.array_equal(nested.x, s2.x)  # without the restart, the chains remember x0


def test_kl_penalty_adds_beta_times_gamma_ref():
    """The reward update with a KL penalty β moves θ by −η(Γ_reward + β Γ_ref), Γ_ref from the same
    chains and the reference draws of key fold_in(key, REFERENCE_STREAM): checked to float rounding."""
    reward = registry.get("reward", "corner")
    theta = jnp.array([1.0, 0.0, 0.5, 0.0, 1.0, -0.5, 0.3])
    beta, key = 0.7, jax.random.key(9)
    x0 = jax.random.normal(jax.random.key(6), (2, 64))
    method = registry.get("method", "implicit")(_components(reward, beta), 1)
    got = jax.jit(method.update)(method.init(x0, theta), key).theta
    x = ula_chain(lambda y: WELLS(y, theta), x0, key, 0.2, 1)
    x_ref = TARGET.sample(jax.random.fold_in(key, REFERENCE_STREAM), 64)
    grad = reward_gradient(WELLS, reward, x, theta) + beta * reference_gradient(WELLS, x, x_ref, theta)
    np.testing.assert_allclose(got, theta - 0.1 * grad, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(beta * reference_gradient(WELLS, x, x_ref, theta)).max()) > 1e-3  # the term matters


def test_kl_penalty_pulls_theta_towards_theta0():
    """Reward training of the hexagon mixture with p_ref = π*(θ0) (exact draws): on the same keys,
    β = 1 ends closer to θ0 than β = 0 (the penalty's minimiser is θ0), by more than a third of the
    unpenalised drift. A penalty that does nothing leaves the two runs equal and fails."""
    hexagon, reward = registry.get("potential", "hexagon"), registry.get("reward", "corner")
    theta0 = jnp.asarray([1.5, 0.0, 1.5, 0.0, 1.5, 0.0])

    def final_theta(beta):
        penalty = scaled(beta, reference(hexagon, lambda k: hexagon.sample(k, theta0, 256))) if beta else None
        c = Components(hexagon, reward, 0.2, 0.0, lambda scale: optax.sgd(0.5 * scale),
                       add(covariance(hexagon, reward), penalty), penalty)
        method = registry.get("method", "implicit")(c, 1)
        update = jax.jit(method.update)
        state = method.init(hexagon.sample(jax.random.key(1), theta0, 256), theta0)
        for k in range(300):
            state = update(state, jax.random.fold_in(jax.random.key(2), k))
        return state.theta

    free, penalised = (float(jnp.linalg.norm(final_theta(beta) - theta0)) for beta in (0.0, 1.0))
    assert free > 0.5, free  # the reward moves θ: the comparison has power
    assert penalised < free * 2 / 3, (penalised, free)


def test_toy_data_sets_have_their_stated_geometry():
    """Draws lie where each generator says (exact checks on 20,000 draws)."""
    n, key = 20_000, jax.random.key(10)
    rings = np.asarray(toy_data.get("rings").sample(key, n))
    r = np.hypot(*rings)
    assert np.all(np.min(np.abs(r[:, None] - np.array([0.75, 1.5, 2.25, 3.0])), axis=1) < 0.08 * 6)
    board = np.asarray(toy_data.get("checkerboard").sample(key, n))
    assert np.all(np.abs(board) <= 4) and np.all((np.floor(board[0] / 2) + np.floor(board[1] / 2)) % 2 == 0)
    moons = np.asarray(toy_data.get("two-moons").sample(key, n))
    assert abs(moons.mean(1)[0]) < 0.1 and moons.min() > -4.5 and moons.max() < 4.5
    eight = toy_data.get("eight-gaussians")
    x = eight.sample(key, n)
    np.testing.assert_allclose(float(jnp.mean(eight.log_density(x))),  # mean log-density = −entropy
                               -(math.log(8) + 1 + math.log(2 * math.pi * 0.35**2)), atol=0.03)
