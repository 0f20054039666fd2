"""Girsanov KL(P_θ ‖ P_θ0) against the closed-form KL of two Gaussian OU paths (paper §4, App. A.2): the
estimator, its adjoint gradient, the logged KL of the current model on fresh paths with its standard
error, and `--final-step none`, where reward and penalty refer to the same variable x_{t_min}."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.implicit import adjoint, finetune, girsanov, methods
from idiff_cli.implicit.paths import sampler_paths
from implicit_gaussian import SDE, chain_moments, draw, path_kl, paths, score, theta, tweedie_mean

N_STEPS, BATCH = 16, 20_000
THETA, THETA0 = (0.8, 1.4), (0.0, 1.0)  # (m, c): the drift difference depends on x


def closed_form_kl(m, c):
    """KL between the laws of the whole discrete paths (x_0..x_n) of the θ and θ0 chains."""
    return path_kl(N_STEPS, (m, c), THETA0)


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
    def heun_like(sde, score, y, t, t_next, key):
        tb = jnp.full(y.shape[:1], t)
        return y + score(y + (t - t_next) * score(y, tb), tb) * (t - t_next)

    p = sampler_paths(Sampler(SDE, 4, heun_like, denoise_final=False), score, (3, 1))
    kl = girsanov.kl_transition(p, score, SDE, SDE.time_grid(4), theta(*THETA0, dtype=jnp.float32), 1.0)
    with pytest.raises(ValueError, match="heun_like evaluated it 2 times"):
        kl(theta(*THETA, dtype=jnp.float32), jnp.zeros((3, 1)), 0, jax.random.key(0))


def logged_kl(params, n_batches: int, batch: int, key) -> tuple[float, float]:
    """The KL finetune logs for θ = `params`: finetune.make_kl_estimator, n_batches × batch fresh paths
    from the slot keys split(key, n_batches) -> (mean, standard error)."""
    sampler, p = paths(N_STEPS, batch)
    estimator = finetune.make_kl_estimator(sampler, p, score, None, jax.random.split(key, n_batches))
    return tuple(float(v) for v in estimator(params, theta(*THETA0)))


@pytest.mark.parametrize("n_batches, batch", [(8, 8), (64, 256)])
def test_logged_kl_of_a_known_model_equals_the_closed_form_path_kl(n_batches, batch):
    """The logged KL of the model θ is within 4 of its own standard errors of the exact path KL, at
    finetune's default (64 paths in batches of 8, SE ≈ 5% of the KL) and on 16,384 paths (SE ≈ 0.3%).
    The mean of N i.i.d. path sums is close to normal (CLT) and the SE estimates its std, so an error
    beyond 4 SE has probability < 2e-4 (Student t, 63 degrees of freedom); the keys are fixed."""
    with enable_x64(True):
        kl, se = logged_kl(theta(*THETA), n_batches, batch, jax.random.key(5))
    exact = closed_form_kl(*THETA)
    assert 0 < se < 0.1 * exact
    assert abs(kl - exact) < 4 * se, (kl, se, exact)


def test_the_girsanov_sum_on_another_models_paths_is_not_the_kl():
    """Negative control of the test above: the same sum at θ on paths sampled under θ0 (what a queue
    warmed under θ0, or batches sampled under earlier θ, hold) misses the exact KL by > 20 standard
    errors (16,384 paths): the logged KL must come from paths of the current θ."""
    with enable_x64(True):
        _, p = paths(N_STEPS, 16_384)
        running = girsanov.kl_running_cost(score, SDE, SDE.time_grid(N_STEPS), theta(*THETA0))
        states = draw(p, theta(*THETA0), jax.random.key(1), N_STEPS)
        kl, se = map(float, girsanov.mean_and_se(girsanov.path_kl(running, theta(*THETA), states)))
    assert abs(kl - closed_form_kl(*THETA)) > 20 * se, (kl, se)


def test_logged_standard_error_is_the_spread_of_the_logged_kl():
    """400 independent sets of 64 fresh paths (8 batches of 8, as logged): the standard deviation of
    their KL means equals the root mean square of their standard errors within 15%. The std of 400
    nearly normal means has a relative standard error of 1/√(2·399) = 3.5% (the path sums' skew adds
    < 0.5%), so 15% is > 4 of those; a SE off by a factor √B (the batch's paths not independent, or
    the wrong divisor) would miss by 65%."""
    with enable_x64(True):
        sampler, p = paths(N_STEPS, 8)
        transition = girsanov.kl_transition(p, score, SDE, sampler.grid, theta(*THETA0), 1.0)
        sums = girsanov.fresh_path_kl(transition, p.init, theta(*THETA), jax.random.split(jax.random.key(7), 3200),
                                      N_STEPS)
        means, ses = map(np.asarray, jax.vmap(girsanov.mean_and_se)(sums.reshape(400, 64)))
    ratio = means.std(ddof=1) / np.sqrt(np.mean(ses**2))
    assert abs(ratio - 1) < 0.15, ratio


def test_with_theta_held_fixed_the_queue_batches_and_fresh_paths_give_the_same_kl():
    """θ ≠ θ0 held fixed (no updates, the queue warmed under θ as well): the Girsanov KL of the 32
    batches the implicit method completes (8,192 paths) and the logged KL on 8,192 fresh paths of
    other keys agree within 4 combined standard errors, √(SE_queue² + SE_fresh²): both are means of
    i.i.d. path sums of the same law P_θ, so their difference is ~normal with that std."""
    T, M, B, steps = N_STEPS, 4, 256, 32
    with enable_x64(True):
        sampler, p = paths(T, B)
        problem = finetune.bind_problem(p, score, SDE, sampler.grid, lambda x: x[:, 0], True)(theta(*THETA0), 1.0, 0.1)
        method = methods.make_method("implicit", problem, T, M)
        carry = method.init(theta(*THETA), jax.random.key(11))
        running = girsanov.kl_running_cost(score, SDE, sampler.grid, theta(*THETA0))

        @jax.jit
        def outer(carry):
            carry, est = method.estimate(theta(*THETA), carry, None)
            return carry, girsanov.path_kl(running, theta(*THETA), est.states)

        sums = []
        for _ in range(steps):
            carry, kl = outer(carry)
            sums.append(kl)
        queue_kl, queue_se = map(float, girsanov.mean_and_se(jnp.concatenate(sums)))
        fresh_kl, fresh_se = logged_kl(theta(*THETA), steps, B, jax.random.key(12))
    assert abs(queue_kl - fresh_kl) < 4 * np.hypot(queue_se, fresh_se), (queue_kl, queue_se, fresh_kl, fresh_se)
    assert abs(fresh_kl - closed_form_kl(*THETA)) < 4 * fresh_se


SDE_WIDE = dataclasses.replace(SDE, t_min=0.5)  # σ²(t_min) = 0.63: the Tweedie step is far from the identity
LAM, BETA = 2.0, 0.5


def closed_form_objective(final_step: str, m: float, c: float) -> float:
    """F(θ) = −λ E[R(y)] + β KL(P_θ ‖ P_θ0) for R(y) = y, y = x_n (`none`) or the Tweedie mean D_θ(x_n)
    (`tweedie`), and the exact path KL of x_0..x_n on the SDE_WIDE grid."""
    mean = chain_moments(N_STEPS, m, c, SDE_WIDE)[0][-1]
    rewarded = mean if final_step == "none" else tweedie_mean(mean, m, c, SDE_WIDE)
    return -LAM * rewarded + BETA * path_kl(N_STEPS, (m, c), THETA0, SDE_WIDE)


def run_problem(final_step: str, batch: int, clip: bool = False, dtype=jnp.float64) -> methods.Problem:
    """finetune's paths and Problem for the Gaussian sampler with a Tweedie step (t_min = 0.5), R(y) = y."""
    sampler, _ = paths(N_STEPS, batch, sde=SDE_WIDE, denoise_final=True)
    p = finetune.run_paths(sampler, score, (batch, 1), None, final_step, clip)
    return finetune.bind_problem(p, score, SDE_WIDE, sampler.grid, lambda y: y[:, 0], True)(
        theta(*THETA0, dtype=dtype), LAM, BETA)


@pytest.mark.parametrize("final_step, other", [("none", "tweedie"), ("tweedie", "none")])
def test_final_step_decides_what_the_reward_sees_and_the_penalty_is_the_path_kl(final_step, other):
    """The adjoint gradient of finetune's objective (terminal −λ R(denoise(x_n)), running β × Girsanov
    increment) equals the central difference (step 1e-5) of its closed form within 4 standard errors of
    20 sub-batches of 1,000 paths; for `none` that closed form is −λ E[x_n] + β KL_path, reward and
    penalty both of the path ending at x_n. Control: the m-gradient misses the other final step's closed
    form by > 100 standard errors (the Tweedie map at t_min = 0.5 changes it by ~0.8)."""
    with enable_x64(True):
        problem = run_problem(final_step, 1000)
        gradient = jax.jit(lambda key: adjoint.discrete_adjoint(
            problem.transition, theta(*THETA), draw(problem.paths, theta(*THETA), key, N_STEPS), key,
            problem.terminal).params)
        grads = [gradient(jax.random.key(i)) for i in range(20)]

    def exact(step, index):
        up, down = list(THETA), list(THETA)
        up[index] += 1e-5
        down[index] -= 1e-5
        return (closed_form_objective(step, *up) - closed_form_objective(step, *down)) / 2e-5

    for name, index in (("m", 0), ("c", 1)):
        g = np.array([float(gr[name]) for gr in grads])
        se = g.std(ddof=1) / np.sqrt(g.size)
        assert abs(g.mean() - exact(final_step, index)) < 4 * se, (name, g.mean(), se, exact(final_step, index))
    g_m = np.array([float(gr["m"]) for gr in grads])
    assert abs(g_m.mean() - exact(other, 0)) > 100 * g_m.std(ddof=1) / np.sqrt(g_m.size)


@pytest.mark.parametrize("clip", [False, True])
def test_final_step_none_rewards_the_last_path_state(clip):
    """With `none`, the images an outer step rewards (Estimate.images) and the fixed-key grid's are the
    last stochastic state x_{t_min} of their paths, clipped to [-1, 1] with --clip; with `tweedie`
    they are not (the denoised mean)."""
    B = 6
    for final_step in ("none", "tweedie"):
        problem = run_problem(final_step, B, clip, jnp.float32)
        method = methods.make_method("implicit", problem, N_STEPS, 4)
        _, est = jax.jit(lambda carry: method.estimate(theta(*THETA, dtype=jnp.float32), carry, None))(
            method.init(theta(*THETA0, dtype=jnp.float32), jax.random.key(2)))
        key = jax.random.key(3)
        images = finetune.make_grid_sampler(problem, B, B, key)(theta(*THETA, dtype=jnp.float32))
        last = draw(problem.paths, theta(*THETA, dtype=jnp.float32), jax.random.split(key, 1)[0], N_STEPS)[-1]
        shown = (lambda y: jnp.clip(y, -1, 1)) if clip else (lambda y: y)
        same = [np.array_equal(est.images, shown(est.states[-1])), np.array_equal(images, shown(last))]
        assert same == [final_step == "none"] * 2, (final_step, same)
