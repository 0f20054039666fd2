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
batches (±10 %), which 5 leaves room for.

The outer step of ddpo is a sampling round and its minibatch updates (methods.ddpo's `update`): the
tests below check a one-update round against the same oracle, that the later updates of a round move
the ratios and meet the clip, the per-label reward statistics against a numpy copy of ddpo-pytorch's
PerPromptStatTracker, the advantages' clip, and that the statistics survive a checkpoint."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import enable_x64

from idiff_cli.checkpoint import Checkpointer, restore_template
from idiff_cli.implicit import ddpo, finetune, methods
from idiff_cli.implicit.paths import sampler_paths
from idiff_cli.implicit.ppo import PPO
from implicit_gaussian import SDE, chain_moments, draw, path_kl, paths, score, theta

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


def gaussian_problem(lam, beta, policy_of=lambda policy: policy, batch=B, dtype=jnp.float64):
    _, p = paths(T, batch)
    problem = finetune.bind_problem(p, SDE, SDE.time_grid(T), reward, bool(beta))(theta(*THETA0, dtype=dtype), lam,
                                                                                 beta)
    return dataclasses.replace(problem, policy=policy_of(problem.policy))


def labelled_problem(lam, beta, batch, n_labels):
    """The Gaussian problem with class labels b mod n_labels per batch position (the score ignores them),
    as a class-conditional pixel model's paths carry them (float32)."""
    sampler, _ = paths(T, batch)
    p = sampler_paths(sampler, score, (batch, 1), jnp.arange(batch) % n_labels, n_labels)
    return finetune.bind_problem(p, SDE, SDE.time_grid(T), reward, bool(beta))(theta(*THETA0, dtype=jnp.float32),
                                                                              lam, beta)


def round_step(method, optimizer):
    """jit: (θ, optimizer state, carry) -> one outer step of `method`, its `update` (a round)."""
    return jax.jit(lambda params, opt_state, carry: method.update(params, opt_state, carry, optimizer))


def holding(differentiated):
    """policy -> the policy whose mean at step k is held (stop-gradient) unless differentiated(k): the
    log-probability terms of the held steps leave the gradient."""
    def policy_of(policy):
        def moments(params, x, k, labels):
            mean, std, kl = policy.moments(params, x, k, labels)
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


def test_a_one_update_round_at_theta_old_is_the_score_function_oracle():
    """A round of one minibatch of all B paths and one pass (--train-batch B, --inner-epochs 1), raw
    advantages and a finite clip range (1e-4), at θ = θ_old: its only update has ratios exactly 1
    (clipfrac and approx_kl 0), so its gradient is the unclipped score-function estimate: the mean over
    50 rounds of 4,000 paths equals −λ ∇E[sin x_T] from the closed form within 5 SE; round 0's equals
    `estimate`'s on the same slot (float64: rtol 1e-12), and the optimizer (SGD, lr 0.1) steps θ by it.
    Old code: no `update` (an outer step was one update of a batch sampled every E steps)."""
    with enable_x64(True):
        closed = -LAM * np.array(jax.grad(lambda m, c: expected_reward(*per_step(m, c)), (0, 1))(*THETA))
        method = methods.make_method("ddpo", gaussian_problem(LAM, 0.0), T, 1, ppo=PPO("raw", 1e-4, 1, B))
        sgd = optax.sgd(0.1)
        step = round_step(method, sgd)
        params = theta(*THETA)
        carry = method.init(params, jax.random.key(11))
        _, first = jax.jit(lambda carry: method.estimate(params, carry, None))(carry)
        rows = []
        for i in range(G):
            moved, _, carry, est, metrics = step(params, sgd.init(params), carry)
            assert metrics == {"clipfrac": 0.0, "approx_kl": 0.0}, metrics
            for name in ("m", "c"):
                np.testing.assert_allclose(moved[name], params[name] - 0.1 * est.grad[name], rtol=1e-12)
                if i == 0:
                    np.testing.assert_allclose(est.grad[name], first.grad[name], rtol=1e-12)
            rows.append([float(est.grad["m"]), float(est.grad["c"])])
        mean, se = mean_and_se(np.array(rows))
    assert np.all(np.abs(mean - closed) < K_SE * se), (mean, closed, se)


@pytest.mark.slow  # a round of updates
def test_later_updates_of_a_round_move_the_ratios_and_the_clip_binds():
    """A round of 64 paths, 2 passes of 2 minibatches (4 Adam updates, lr 1e-2), ddpo-pytorch's clip
    range 1e-4 (the default): the first update's ratios are exactly 1 (a one-update round logs clipfrac
    and approx_kl 0), the later ones are not (approx_kl > 0) and some fall outside 1 ± 1e-4 (clipfrac
    > 0, measured 0.73); the clip changes the updates (θ after the round differs from the round with
    ε = 1e9, whose clipfrac is 0). Round i samples slot key fold_in(root, i) under the θ it starts from.
    Old code: an outer step was one full-batch update (no `update`, no clipfrac), the clip range 0.2."""
    problem = gaussian_problem(LAM, 0.1, batch=64, dtype=jnp.float32)
    params, root = theta(*THETA0, dtype=jnp.float32), jax.random.key(5)
    adam = optax.adam(1e-2)
    assert PPO() == ("normalized", 1e-4, 1, None, 5.0) and PPO().minibatch(64) == 32 and PPO().minibatch(1) == 1

    def run(ppo, params=params, carry=None):
        method = methods.make_method("ddpo", problem, T, 1, ppo=ppo)
        carry = method.init(params, root) if carry is None else carry
        return round_step(method, adam)(params, adam.init(params), carry)

    single = run(PPO(train_batch=64))[4]
    assert single == {"clipfrac": 0.0, "approx_kl": 0.0}, single
    clipped = run(PPO(inner_epochs=2))
    loose = run(PPO(clip_range=1e9, inner_epochs=2))
    assert clipped[4]["clipfrac"] > 0.1 and clipped[4]["approx_kl"] > 0, clipped[4]
    assert loose[4]["clipfrac"] == 0 and loose[4]["approx_kl"] > 0, loose[4]
    assert any(float(clipped[0][name]) != float(loose[0][name]) for name in ("m", "c"))
    np.testing.assert_allclose(clipped[3].states, draw(problem.paths, params, jax.random.fold_in(root, 0), T),
                               rtol=1e-5)
    moved, _, carry, _, _ = clipped
    second = run(PPO(inner_epochs=2), moved, carry)
    np.testing.assert_allclose(second[3].states, draw(problem.paths, moved, jax.random.fold_in(root, 1), T),
                               rtol=1e-5)
    assert int(second[2][0]) == 2


class PerPromptStatTracker:
    """ddpo-pytorch's ddpo_pytorch/stat_tracking.py (buffer_size = min_count = 16), reimplemented."""

    def __init__(self, buffer_size=16, min_count=16):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts, rewards):
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            buffer = self.stats.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(mine)
            source = rewards if len(buffer) < self.min_count else np.asarray(buffer)
            advantages[prompts == prompt] = (mine - np.mean(source)) / (np.std(source) + 1e-6)
        return advantages


def test_per_label_statistics_are_ddpo_pytorchs_stat_tracker():
    """8 rounds of 24 rewards with labels among 5 (label 0 frequent, 20 of them in round 2: more than a
    buffer holds; label 4 never drawn): λ clip(z, ±c) with z from ddpo.advantages' tracker equals
    λ clip(z, ±c) with ddpo-pytorch's PerPromptStatTracker's z, every round (float64, rtol 1e-10, c = 1.5:
    some clipped); the round's statistics until a label has 16 rewards, its buffer's after. Old code:
    advantages over the batch only (no labels, no tracker)."""
    rng = np.random.default_rng(0)
    reference, lam, clip = PerPromptStatTracker(), -0.7, 1.5
    used = set()
    with enable_x64(True):
        tracker = ddpo.tracker_init(5, jnp.float64)
        step = jax.jit(lambda r, labels, tracker: ddpo.advantages(r, "normalized", lam, clip, labels, tracker))
        for i in range(8):
            labels = rng.choice(4, 24, p=[0.55, 0.25, 0.15, 0.05])
            if i == 2:
                labels[:20] = 0
            rewards = rng.normal(labels * 0.5, 1.0 + labels)
            want = lam * np.clip(reference.update(labels, rewards), -clip, clip)
            got, tracker = step(jnp.asarray(rewards), jnp.asarray(labels, jnp.int32), tracker)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
            used |= {label for label in np.unique(labels) if len(reference.stats[label]) >= 16}
    assert used >= {0, 1}, used  # the buffers' statistics were used
    assert int(tracker.seen[4]) == 0


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
        old, std = jax.vmap(lambda x, k: policy.moments(theta(*THETA0), x, k, None)[:2])(states[:-1], ks)
        new = jax.vmap(lambda x, k: policy.moments(theta(*THETA), x, k, None)[0])(states[:-1], ks)
        adv, _ = ddpo.advantages(reward(states[-1]), "normalized", LAM, 1e9)
        rho = np.exp(np.asarray(jax.vmap(ddpo.log_ratio)(states[1:], new, old, std)))  # [T, n]

        @jax.jit
        def gradient(eps, batch, keep):
            held = holding(lambda k: (keep < 0) | (k == keep))(policy)
            g, _ = ddpo.policy_gradient(held, theta(*THETA), batch, eps)
            return jnp.stack([g["m"], g["c"]])

        clipped = gradient(1e-9, ddpo.Batch(states, old, adv, None), -1)
        kept = [(i, k) for i in range(n) for k in range(T) if (rho[k, i] - 1) * float(adv[i]) < 0]
        expected = sum(gradient(1e9, ddpo.Batch(states[:, i:i + 1], old[:, i:i + 1], adv[i:i + 1], None), k)
                       for i, k in kept) / n
    assert 0 < len(kept) < n * T, len(kept)
    np.testing.assert_allclose(clipped, expected, rtol=1e-9)


def test_the_clipped_ratio_is_ddpo_pytorchs_per_coordinate_ratio():
    """On states of d = 12 coordinates (a linear policy m_θ(x) = θ x, σ = 0.3), an update off θ_old logs
    ddpo-pytorch's diagnostics: its log-probability of a step is the mean over the coordinates of the
    Gaussian log-densities (ddim_with_logprob.py), written here in numpy; approx_kl = ½ mean (Δ log p)²
    (rtol 1e-9) and clipfrac = mean(|exp Δ log p − 1| > ε). A ratio of whole transitions (Δ summed, not
    averaged) would be d times as far from 1: with ε = 0.02 the two clip fractions differ here."""
    d, n, b, sigma, eps = 12, 3, 8, 0.3, 2e-2
    with enable_x64(True):
        keys = jax.random.split(jax.random.key(4), 3)
        states = jax.random.normal(keys[0], (n + 1, b, 3, 4))
        old_theta, theta_ = 0.9, 0.9 + 2e-3

        def moments(params, x, k, labels):
            return params["w"] * x, jnp.asarray(sigma), jnp.zeros(x.shape[:1])

        policy = ddpo.Policy(moments, lambda params, x, k, labels: moments(params, x, k, labels)[:2], 1.0)
        old = old_theta * states[:-1]
        adv = jax.random.normal(keys[1], (b,))
        _, stats = ddpo.policy_gradient(policy, {"w": jnp.asarray(theta_)}, ddpo.Batch(states, old, adv, None), eps)

        x, x_next = np.asarray(states[:-1]), np.asarray(states[1:])

        def log_prob(mean):  # ddpo-pytorch: the mean over all but the batch dimension
            per = -(x_next - mean) ** 2 / (2 * sigma**2) - np.log(sigma) - np.log(np.sqrt(2 * np.pi))
            return per.reshape(n, b, -1).mean(axis=2)

        delta = log_prob(theta_ * x) - log_prob(old_theta * x)
    np.testing.assert_allclose(float(stats.approx_kl), 0.5 * np.mean(delta**2), rtol=1e-9)
    assert float(stats.clipfrac) == np.mean(np.abs(np.exp(delta) - 1) > eps)
    assert 0 < np.mean(np.abs(np.exp(delta) - 1) > eps) < np.mean(np.abs(np.exp(d * delta) - 1) > eps)


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
    """normalized, unlabelled: λ (R − mean R)/(std R + 1e-8) has batch mean 0 and std |λ| (4 rewards: no
    |z| reaches the clip), its sign ordering that of λ R; raw: λ R."""
    r = jnp.asarray([0.1, 0.4, -0.3, 0.9])
    a = np.asarray(ddpo.advantages(r, "normalized", lam, 5.0)[0])
    np.testing.assert_allclose([a.mean(), a.std()], [0.0, abs(lam)], atol=1e-6)
    assert np.all(np.argsort(a) == np.argsort(lam * np.asarray(r)))
    np.testing.assert_allclose(ddpo.advantages(r, "raw", lam, 5.0)[0], lam * r)


def test_normalized_advantages_are_clipped_at_adv_clip():
    """One reward of 1 among 29 of 0: its z = (1 − 1/30)/std = 5.39 is clipped to --adv-clip 5 (× λ), the
    others' z = −0.19 are not; raw advantages λ R are not clipped. Old code: no clip (5.39 λ)."""
    r = jnp.asarray([0.0] * 29 + [1.0])
    z = (np.asarray(r) - 1 / 30) / (np.std(np.asarray(r)) + 1e-8)
    assert z[-1] > 5.3
    a = np.asarray(ddpo.advantages(r, "normalized", -2.0, 5.0)[0])
    np.testing.assert_allclose(a, -2.0 * np.clip(z, -5, 5), rtol=1e-6)
    assert a[-1] == -10.0
    np.testing.assert_allclose(ddpo.advantages(3 * r, "raw", 4.0, 5.0)[0], 12 * r)


def test_a_resumed_run_keeps_the_label_statistics(tmp_path):
    """A class-labelled run (batch 8, labels b mod 3: 3, 3 and 2 paths a round), 7 rounds with Adam; the
    state after round 6 (θ, Adam's, the carry: labels 0 and 1 have 18 rewards, label 2 has 12) saved with
    the run's Checkpointer and restored into a zero template: round 7 from it gives the uninterrupted
    θ, gradient and metrics exactly. The carry's tracker matters: round 7 with it emptied gives another
    gradient. Old code: no tracker in the carry (batch statistics only)."""
    method = methods.make_method("ddpo", labelled_problem(LAM, 0.1, 8, 3), T, 1, ppo=PPO(inner_epochs=2))
    adam = optax.adam(1e-2)
    step = round_step(method, adam)
    params = theta(*THETA0, dtype=jnp.float32)
    state = (params, adam.init(params), method.init(params, jax.random.key(3)))
    for _ in range(6):
        state = step(*state)[:3]
    assert [int(n) for n in state[2][2].seen] == [18, 18, 12]
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    checkpoints.save(6, state)
    checkpoints.wait()
    restored, _ = checkpoints.restore(restore_template(jax.eval_shape(lambda: state)), 6)
    checkpoints.close()
    whole, resumed = step(*state), step(*restored)
    for a, b in zip(jax.tree.leaves(whole[:4]), jax.tree.leaves(resumed[:4])):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    assert whole[4] == resumed[4]
    carry = state[2]
    emptied = step(state[0], state[1], (carry[0], carry[1], ddpo.tracker_init(3, jnp.float32)))
    assert float(emptied[3].grad["m"]) != float(whole[3].grad["m"])
