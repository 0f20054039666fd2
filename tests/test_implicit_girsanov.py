"""Girsanov KL(P_θ ‖ P_θ0) against the closed-form KL of two Gaussian OU paths (paper §4, App. A.2): the
estimator, its adjoint gradient, the logged KL of the current model on fresh paths with its standard
error, and `--final-step none`, where reward and penalty refer to the same variable x_{t_min}."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from idiff_cli.diffusion import ddpm, samplers
from idiff_cli.diffusion.samplers import Sampler, euler_maruyama_step
from idiff_cli.diffusion.sde import Cosine
from idiff_cli.implicit import adjoint, finetune, girsanov, methods
from idiff_cli.implicit.paths import sampler_paths
from implicit_gaussian import SDE, chain_moments, draw, gaussian_kl, path_kl, paths, score, theta, tweedie_mean

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
        running = girsanov.kl_running_cost(euler_maruyama_step, score, SDE, SDE.time_grid(N_STEPS), theta(*THETA0))
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
        kl = girsanov.kl_transition(p, SDE, SDE.time_grid(N_STEPS), theta(*THETA0), 1.0)
        zero = lambda q, x, key: 0.0 * x[:, 0]
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


def test_step_and_score_needs_a_step_that_evaluates_the_score_once_at_x():
    """The fused transition reuses the step's score evaluation as sθ(x_k, t_k) (paths.step_and_score); a
    step that evaluates the score elsewhere (here also at x + h s, a Heun-like predictor) is refused, not
    silently mixed."""
    def heun_like(sde, score, y, t, t_next, key):
        tb = jnp.full(y.shape[:1], t)
        return y + score(y + (t - t_next) * score(y, tb), tb) * (t - t_next)

    p = sampler_paths(Sampler(SDE, 4, heun_like, denoise_final=False), score, (3, 1))
    with pytest.raises(ValueError, match="heun_like evaluated it 2 times"):
        p.step_and_score(theta(*THETA, dtype=jnp.float32), jnp.zeros((3, 1)), 0, jax.random.key(0))


def logged_kl(params, n_batches: int, batch: int, key) -> tuple[float, float]:
    """The KL finetune logs for θ = `params`: finetune.make_kl_estimator, n_batches × batch fresh paths
    from the slot keys split(key, n_batches) -> (mean, standard error)."""
    sampler, p = paths(N_STEPS, batch)
    estimator = finetune.make_kl_estimator(sampler, lambda _: p, jax.random.split(key, n_batches))
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
        running = girsanov.kl_running_cost(euler_maruyama_step, score, SDE, SDE.time_grid(N_STEPS), theta(*THETA0))
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
        transition = girsanov.kl_transition(p, SDE, sampler.grid, theta(*THETA0), 1.0)
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
        problem = finetune.bind_problem(p, SDE, sampler.grid, lambda x: x[:, 0], True)(theta(*THETA0), 1.0, 0.1)
        method = methods.make_method("implicit", problem, T, M)
        carry = method.init(theta(*THETA), jax.random.key(11))
        running = girsanov.kl_running_cost(euler_maruyama_step, score, SDE, sampler.grid, theta(*THETA0))

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
    return finetune.bind_problem(p, SDE_WIDE, sampler.grid, lambda y: y[:, 0], True)(
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
        images = finetune.make_grid_sampler(lambda _: problem, B, B, key)(theta(*THETA, dtype=jnp.float32), None)
        last = draw(problem.paths, theta(*THETA, dtype=jnp.float32), jax.random.split(key, 1)[0], N_STEPS)[-1]
        shown = (lambda y: jnp.clip(y, -1, 1)) if clip else (lambda y: y)
        same = [np.array_equal(est.images, shown(est.states[-1])), np.array_equal(images, shown(last))]
        assert same == [final_step == "none"] * 2, (final_step, same)


# ---- the transition KL of each stochastic step, and the path KL of a DDPM chain ----

DDPM_SMALL = ddpm.DiscreteDDPM(num_train_timesteps=100, beta_end=0.2, clip_sample=False)  # ᾱ_99 ≈ e^{-10}
DDPM_LARGE = dataclasses.replace(DDPM_SMALL, variance_type="fixed_large", steps_offset=1)
DDPM_CLIPPED = dataclasses.replace(DDPM_SMALL, clip_sample=True)


@pytest.mark.parametrize("step_fn, sde", [(euler_maruyama_step, SDE), (samplers.ddpm_step, SDE),
                                          (samplers.ddpm_step, Cosine()), (ddpm.ddpm_step, DDPM_SMALL),
                                          (ddpm.ddpm_step, DDPM_LARGE), (ddpm.ddpm_step, DDPM_CLIPPED)],
                         ids=["em-ou", "ddpm-ou", "ddpm-cosine", "discrete-small", "discrete-large", "discrete-clip"])
def test_transition_kl_is_the_kl_between_the_two_gaussian_transitions(step_fn, sde):
    """girsanov.transition_kl from the step's declared moments equals the closed-form KL of two Gaussians
    N(m, v I), N(m0, v I) whose means and variance are read off the step as a black box (float64, rtol
    1e-9): m − m0 from the step under the two scores with the same noise, √v from the step under one score
    with two noises. With clip_sample most x̂0 of the high-noise step are clipped: the KL differs from the
    unclipped b²‖Δs‖²/(2av) there, and is still the transitions' KL."""
    with enable_x64(True):
        grid = sde.time_grid(8)
        k = 2
        t, t_next = grid[k], grid[k + 1]
        y, s, s0 = jax.random.normal(jax.random.key(0), (3, 4, 6), jnp.float64)
        s0 = s + 0.3 * s0

        def step(score_value, key):
            return np.asarray(step_fn(sde, lambda y_, t_: score_value, y, t, t_next, key))

        k1, k2 = jax.random.key(1), jax.random.key(2)
        dmean = step(s, k1) - step(s0, k1)
        dxi = np.asarray(jax.random.normal(k1, y.shape, y.dtype) - jax.random.normal(k2, y.shape, y.dtype))
        std = (step(s, k1) - step(s, k2)) / dxi
        v = std[0, 0] ** 2
        np.testing.assert_allclose(std, np.sqrt(v), rtol=1e-9)
        exact = [gaussian_kl(dmean[i], v * np.eye(6), np.zeros(6), v * np.eye(6)) for i in range(4)]
        kl = np.asarray(girsanov.transition_kl(step_fn, sde, s, s0, y, t, t_next))
    np.testing.assert_allclose(kl, exact, rtol=1e-9)
    assert min(exact) > 1e-4 and max(exact) > 1e-2
    if sde is DDPM_CLIPPED:
        a = sde.alphas_cumprod[int(t)] / sde.alphas_cumprod[int(t_next)]
        unclipped = (1 - a) ** 2 * np.sum(np.asarray(s - s0) ** 2, axis=1) / (2 * a * v)
        assert np.all(np.abs(kl / unclipped - 1) > 0.1), (kl, unclipped)


@pytest.mark.parametrize("sde", [DDPM_SMALL, DDPM_CLIPPED])
def test_a_noise_free_ddpm_step_adds_no_kl(sde):
    """DDPM's last step from t = 0 into x_0 draws no noise (the same output for two keys): a deterministic
    θ-dependent map, outside the Girsanov sum (0), not an infinite KL."""
    grid = sde.time_grid(8)
    y, s = jax.random.normal(jax.random.key(0), (2, 4, 6))
    t, t_next = grid[-2], grid[-1]
    outputs = [ddpm.ddpm_step(sde, lambda y_, t_: s, y, t, t_next, jax.random.key(i)) for i in (1, 2)]
    assert np.array_equal(*outputs)
    np.testing.assert_array_equal(girsanov.transition_kl(ddpm.ddpm_step, sde, s, 0.5 * s, y, t, t_next), 0.0)


def test_a_noisy_last_step_draws_the_fixed_large_noise_into_x0_and_its_kl_counts():
    """--final-step noisy: the step from t = 0 into x_0 keeps diffusers' mean and draws noise of variance
    1 − ᾱ_0 ≈ β_0 (read off the step as a black box, as above); its transition KL is the closed-form KL
    of the two Gaussians (float64, rtol 1e-9), where the plain step adds 0."""
    sde = DDPM_SMALL
    step_fn = ddpm.with_noisy_last_step(sde.sampler(8, "ddpm")).step_fn
    with enable_x64(True):
        grid = sde.time_grid(8)
        t, t_next = grid[-2], grid[-1]
        y, s, s0 = jax.random.normal(jax.random.key(0), (3, 4, 6), jnp.float64)
        s0 = s + 0.3 * s0
        k1, k2 = jax.random.key(1), jax.random.key(2)
        step = lambda fn, value, key: np.asarray(fn(sde, lambda y_, t_: value, y, t, t_next, key))  # noqa: E731
        np.testing.assert_array_equal(step(ddpm.ddpm_step, s, k1), step(ddpm.ddpm_step, s, k2))
        dxi = np.asarray(jax.random.normal(k1, y.shape, y.dtype) - jax.random.normal(k2, y.shape, y.dtype))
        std = (step(step_fn, s, k1) - step(step_fn, s, k2)) / dxi
        v = std[0, 0] ** 2
        np.testing.assert_allclose(std, np.sqrt(v), rtol=1e-9)
        # 1 − ᾱ_0 = β_0 up to the float32 rounding of ᾱ_0 = 1 − β_0 (2e-4 relative)
        assert float(t) == 0 and v == pytest.approx(float(sde.betas[0]), rel=2e-4)
        mean = step(ddpm.ddpm_step, s, k1)
        np.testing.assert_allclose(step(step_fn, s, k1) - np.sqrt(v) * np.asarray(jax.random.normal(k1, y.shape)), mean,
                                   rtol=1e-9, atol=1e-12)
        dmean = mean - step(ddpm.ddpm_step, s0, k1)
        exact = [gaussian_kl(dmean[i], v * np.eye(6), np.zeros(6), v * np.eye(6)) for i in range(4)]
        kl = np.asarray(girsanov.transition_kl(step_fn, sde, s, s0, y, t, t_next))
        plain = np.asarray(girsanov.transition_kl(ddpm.ddpm_step, sde, s, s0, y, t, t_next))
    np.testing.assert_allclose(kl, exact, rtol=1e-9)
    assert min(exact) > 1e-5 and np.all(plain == 0)


def test_a_deterministic_sampler_has_no_girsanov_kl():
    """kl_transition refuses the paths of a sampler that is not `stochastic` (ddim: no transition density)."""
    p = sampler_paths(Sampler(SDE, 4, ddpm.ddim_step, denoise_final=False), score, (2, 1))
    assert not p.stochastic
    with pytest.raises(ValueError, match="ddim_step is deterministic"):
        girsanov.kl_transition(p, SDE, SDE.time_grid(4), theta(*THETA0, dtype=jnp.float32), 1.0)


def ddpm_score(sde):
    """s_θ(x, t) = −c (x − m α(t)) on a discrete process: for c = 1 the score of the marginals of N(m, 1)."""

    def score_(params, x, t, labels=None):
        alpha = sde.alpha(t).reshape(t.shape + (1,) * (x.ndim - 1))
        return -params["c"] * (x - params["m"] * alpha)

    return score_


def ddpm_transition_kls(sde, n_steps: int, theta_, theta0, noisy_last: bool = False) -> np.ndarray:
    """The closed-form KL of each ancestral transition, E_{x_k ∼ θ-chain} (Δmean_k(x_k))²/(2 v_k), [n]: with
    no clipping the step's mean is (x + b s)/√a (a = ᾱ_t/ᾱ_t', b = 1 − a), affine in x for the scores
    above, so x_k is Gaussian with moments propagated from x_0 ~ N(0, 1); v_k = b (fixed_large) or
    b (1 − ᾱ_t')/(1 − ᾱ_t) (fixed_small), 0 (no term) from t = 0 or into t' = −1 with fixed_small;
    with `noisy_last` the step into t' = −1 has v = 1 − ᾱ_t whatever t."""
    (m, c), (m0, c0) = theta_, theta0
    abar = np.concatenate([[1.0], np.asarray(sde.alphas_cumprod, np.float64)])
    grid = np.asarray(sde.time_grid(n_steps)).astype(int)
    mean, var, kls = 0.0, 1.0, []
    for t, t_next in zip(grid[:-1], grid[1:]):
        at, an = abar[t + 1], abar[t_next + 1]
        a, alpha = at / an, np.sqrt(at)
        b = 1 - a
        v = b if sde.variance_type == "fixed_large" else b * (1 - an) / (1 - at)
        noisy = t > 0 and v > 0
        if noisy_last and t_next == -1:
            v, noisy = 1 - at, True
        p, q = -(c - c0) * b / np.sqrt(a), (c * m - c0 * m0) * alpha * b / np.sqrt(a)  # Δmean = p x + q
        kls.append((p**2 * (var + mean**2) + 2 * p * q * mean + q**2) / (2 * v) if noisy else 0.0)
        A, B = (1 - b * c) / np.sqrt(a), b * c * m * alpha / np.sqrt(a)
        mean, var = A * mean + B, A**2 * var + v * noisy
    return np.array(kls)


@pytest.mark.parametrize("sde, noisy_last", [(DDPM_SMALL, False), (DDPM_LARGE, False), (DDPM_SMALL, True)],
                         ids=["fixed_small", "fixed_large-offset1", "fixed_small-noisy-last"])
def test_logged_kl_on_a_ddpm_sampler_is_the_sum_of_the_transition_kls(sde, noisy_last):
    """finetune's logged KL on the ancestral sampler of a discrete DDPM process (8 respaced steps of 100)
    is within 4 of its standard errors (16,384 fresh paths, SE < 2% of the KL) of the sum of the closed-form
    transition KLs; with fixed_small the last step (from t = 0) adds nothing, with fixed_large and
    steps_offset 1 it is a noisy transition like the others, and so it is with --final-step noisy."""
    n = 8
    score_ = ddpm_score(sde)
    with enable_x64(True):
        sampler = sde.sampler(n, "ddpm")
        sampler = ddpm.with_noisy_last_step(sampler) if noisy_last else sampler
        p = sampler_paths(sampler, score_, (256, 1))
        estimator = finetune.make_kl_estimator(sampler, lambda _: p, jax.random.split(jax.random.key(5), 64))
        kl, se = map(float, estimator(theta(*THETA), theta(*THETA0)))
    exact = ddpm_transition_kls(sde, n, THETA, THETA0, noisy_last)
    assert exact[-1] == 0 if sde is DDPM_SMALL and not noisy_last else exact[-1] > 0
    assert 0 < se < 0.02 * exact.sum()
    assert abs(kl - exact.sum()) < 4 * se, (kl, se, exact.sum())
