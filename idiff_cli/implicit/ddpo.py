"""Policy-gradient finetuning: the denoising chain as a Markov decision process (DDPO, Black et al. 2023,
§4.2-4.3, run as ddpo-pytorch's scripts/train.py runs it; with the KL term of DPOK, Fan et al. 2023, §4.1).

A stochastic sampler (Euler–Maruyama, DDPM ancestral: a samplers.GaussianStep) makes the path
x_0 → x_1 → … → x_n by Gaussian transitions whose variance v_k does not depend on θ:

    π_θ(x_{k+1} | x_k) = N(x_{k+1}; m_θ(x_k, k), v_k I),   m_θ and √v_k from the step's `moments`.

The image y = D(x_n) (the Tweedie step, or x_n itself) gets the reward R(y), a black box: DDPO needs
no ∇R, so non-differentiable rewards work. With the likelihood-ratio identity
∇_θ E[R] = E[R(y) Σ_k ∇_θ log π_θ(x_{k+1} | x_k)] (DDPO §4.3, "DDPO_SF") and PPO's clipped importance
ratios ρ_k = π_θ(x_{k+1} | x_k)/π_θold(x_{k+1} | x_k) for paths sampled under θ_old (DDPO §4.3,
"DDPO_IS"; Schulman et al. 2017), the loss of one update on a minibatch of paths is

    L(θ) = mean_b Σ_k [ −d · min(ρ̃_k^b A^b, clip(ρ̃_k^b, 1 − ε, 1 + ε) A^b) + β KL_k(θ; x_k^b) ],
    ρ̃_k = ρ_k^(1/d),   KL_k(θ; x) = ‖m_θ(x, k) − m_θ0(x, k)‖² / (2 v_k)   (the Girsanov increment of girsanov.py),

with advantages A = λ R (raw) or A = λ clip((R − μ)/(σ + eps), −c, c) (normalized; c = --adv-clip,
ddpo-pytorch's adv_clip_max). μ, σ are ddpo-pytorch's: for labelled paths (a class label, a prompt)
its PerPromptStatTracker's, the mean and std of the last STATS_BUFFER rewards of the path's label
(this round's included) once the label has that many, else the round's over all labels, eps = 1e-6;
for unlabelled paths the round's, eps = 1e-8. ρ̃_k is the ratio ddpo-pytorch clips: its log-probability of
a step is the *mean* of the d = H·W·C coordinates' Gaussian log-densities (ddim_with_logprob.py), so its
ratio is the transition's ratio to the power 1/d, and its clip range ε = 1e-4 bounds that per-coordinate
ratio; the factor d restores the transition's score-function gradient at ρ̃ = 1 (d ρ̃ ∇ log ρ̃ = ∇ log ρ),
so that λ and β keep their weights in F. Where θ = θ_old, ρ_k = 1 and ∇L is the score-function
estimate −mean_b A^b Σ_k ∇ log π_θ(x_{k+1}^b | x_k^b) + β mean_b Σ_k ∇KL_k: with raw advantages its
expectation is −λ ∇E[R] (tests/test_ddpo.py). ddpo-pytorch averages over the steps (its gradient
accumulation); the sum keeps that expectation and the weights λ, β of F = −λ E R + β KL(P_θ ‖ P_θ0) as
the other methods have them (Adam's steps do not depend on a constant factor).

**The KL term's gradient.** E_{P_θ}[Σ_k KL_k(θ; x_k)] is the path KL(P_θ ‖ P_θ0); its gradient is

    E[Σ_k ∇_θ KL_k(θ; x_k)]  (pathwise: θ in the transition at the sampled state)
    + E[(Σ_k KL_k(θ; x_k)) Σ_k ∇_θ log π_θ(x_{k+1} | x_k)]  (score function: θ in the law of the states).

L's KL term gives the first part alone, at the stored states (held fixed: stop-gradient data); the
score-function part is left out, as DPOK's gradient of its per-step KL regulariser does (DPOK §4.1, Algorithm 1).
After the first update of a round the states are θ_old's.

**What the estimator leaves out.** Only θ's part in the Gaussian transitions' means is differentiated.
The final Tweedie step D_θ (and a step without noise, v_k = 0: DDPM's last step into x_0) is a
deterministic map of θ, not a transition of the MDP: its θ-dependence, E[∇_θ R(D_θ(x_n))], is not in
the gradient (it needs ∇R). With `--final-step none` the reward sees x_n and the estimator is unbiased
for ∇E[R(x_n)].

**Log-ratios in float32.** log ρ_k is computed from the two means, not as a difference of two
log-probabilities: with x' = x_{k+1}, log ρ = (‖x' − m_old‖² − ‖x' − m_θ‖²)/(2v) = ⟨m_θ − m_old,
2x' − m_θ − m_old⟩/(2v), an expression that is exactly 0 at m_θ = m_old, while each log-probability
is a sum of d = H·W·C terms whose float32 rounding (~1e-5 for MNIST) is the size of a clip range. So
a round keeps the old *means* m_θold(x_k) [n, B, ...] rather than old log-probabilities, and a round's
first update, at θ = θ_old, takes its ratios from its own means: exactly 1, whatever the rounding of
the pass that stored them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from idiff_cli.implicit import girsanov

BATCH_EPS = 1e-8  # ddpo-pytorch's (r − mean)/(std + 1e-8) over the round, for unlabelled paths
LABEL_EPS = 1e-6  # its PerPromptStatTracker's std + 1e-6
STATS_BUFFER = 16  # its per_prompt_stat_tracking: the last 16 rewards of a label, used once there are 16


class Policy(NamedTuple):
    """The sampler's chain under θ as a policy. moments(params, x_k [B, ...], k, labels) -> (m_θ(x_k, k)
    [B, ...], √v_k [] or [B], β × KL_k(θ; x_k) [B] or zeros), one evaluation of θ's network (and of θ0's
    with a KL term) under the conditioning `labels` [B] (or None); mean(params, x_k, k, labels) ->
    (m_θ(x_k, k), √v_k), θ's network alone; lam: λ, the weight of the reward in the advantages (may be
    traced)."""

    moments: Callable
    mean: Callable
    lam: Any


class Batch(NamedTuple):
    """Paths sampled under θ_old: states x_0..x_n [n + 1, B, ...], the old means m_θold(x_k, k)
    [n, B, ...] (None where θ is θ_old: the ratios are 1), advantages [B] (λ included) and the paths'
    labels [B] (None: an unconditional model)."""

    states: jax.Array
    means: Any
    advantages: jax.Array
    labels: Any


class Tracker(NamedTuple):
    """ddpo-pytorch's PerPromptStatTracker as arrays: the last STATS_BUFFER rewards of each of L labels in
    ring buffers, rewards [L, STATS_BUFFER], and seen [L] int32, the rewards of each label written so far
    (the next one goes to slot seen mod STATS_BUFFER)."""

    rewards: jax.Array
    seen: jax.Array


class Diagnostics(NamedTuple):
    """Of an update: clipfrac, the fraction of its (path, step) per-coordinate ratios with |ρ̃ − 1| > ε, and
    approx_kl, ½ mean (log ρ̃)² over them (ddpo-pytorch's)."""

    clipfrac: jax.Array
    approx_kl: jax.Array


def gaussian_policy(step_fn: Callable, score: Callable, sde: Any, grid: jax.Array, params0: Any, lam: Any,
                    beta: Any, with_kl: bool) -> Policy:
    """The Policy of a samplers.GaussianStep `step_fn` on `grid` with score(params, x, t, labels)
    (paths.score): the step's `moments` at sθ(x_k, t_k) and, with `with_kl`, β × girsanov.transition_kl
    against θ0."""

    def scored(params, x, k, labels):
        """(sθ(x_k, t_k), the step's mean and std at it)."""
        s = score(params, x, jnp.full((x.shape[0],), grid[k], x.dtype), labels)
        return (s, *step_fn.moments(sde, s, x, grid[k], grid[k + 1]))

    def mean(params, x, k, labels):
        return scored(params, x, k, labels)[1:]

    def moments(params, x, k, labels):
        s, m, std = scored(params, x, k, labels)
        if not with_kl:
            return m, std, jnp.zeros(x.shape[:1], x.dtype)
        s0 = score(jax.lax.stop_gradient(params0), x, jnp.full((x.shape[0],), grid[k], x.dtype), labels)
        return m, std, beta * girsanov.transition_kl(step_fn, sde, s, s0, x, grid[k], grid[k + 1])

    return Policy(moments, mean, lam)


def _variance(std: jax.Array, x: jax.Array) -> jax.Array:
    """v [B] from a std [] or [B]."""
    return jnp.broadcast_to(jnp.asarray(std, x.dtype) ** 2, x.shape[:1])


def _sum_per_sample(v: jax.Array) -> jax.Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


def gaussian_log_prob(x_next: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log N(x_next; mean, std² I) per sample [B] (std [] or [B], > 0): −‖x' − m‖²/(2v) − (d/2) log(2πv)."""
    var = _variance(std, x_next)
    d = math.prod(x_next.shape[1:])
    return -_sum_per_sample((x_next - mean) ** 2) / (2 * var) - 0.5 * d * jnp.log(2 * jnp.pi * var)


def log_ratio(x_next: jax.Array, mean: jax.Array, old: jax.Array, std: jax.Array) -> jax.Array:
    """log π_θ(x' | x) − log π_θold(x' | x) = ⟨m_θ − m_old, 2x' − m_θ − m_old⟩/(2v) per sample [B], for
    means m_θ = `mean` and m_old = `old` [B, ...] and the step's std [] or [B]; 0 where v = 0 (a step
    without noise: no transition density, no term)."""
    var = _variance(std, x_next)
    noisy = var > 0
    inner = _sum_per_sample((mean - old) * (2 * x_next - mean - old))
    return jnp.where(noisy, inner / (2 * jnp.where(noisy, var, 1.0)), 0.0)


def tracker_init(n_labels: int, dtype: Any) -> Tracker:
    """Empty buffers for labels 0 .. n_labels − 1."""
    return Tracker(jnp.zeros((n_labels, STATS_BUFFER), dtype), jnp.zeros((n_labels,), jnp.int32))


def track(tracker: Tracker, labels: jax.Array, rewards: jax.Array) -> tuple[Tracker, jax.Array, jax.Array]:
    """(the tracker with the round's rewards [B] of labels [B] appended in batch order, the mean [B] and
    std + 1e-6 [B] each path is normalised by): its label's buffer's once that holds STATS_BUFFER rewards
    (after this round's), else the round's over all labels (PerPromptStatTracker.update)."""
    n_labels, size = tracker.rewards.shape
    rewards = rewards.astype(tracker.rewards.dtype)
    same = labels[:, None] == labels[None, :]
    rank = jnp.sum(jnp.tril(same, -1), axis=1)  # the path's place among its label's paths this round
    last = rank >= jnp.sum(same, axis=1) - size  # only a label's last `size` rewards stay in its ring
    slot = (tracker.seen[labels] + rank) % size  # distinct for the kept paths of a label
    rows = jnp.where(last, labels, n_labels)  # out of range: dropped
    buffer = tracker.rewards.at[rows, slot].set(rewards, mode="drop")
    seen = tracker.seen.at[labels].add(1)
    full = seen[labels] >= size
    mean = jnp.where(full, jnp.mean(buffer, axis=1)[labels], jnp.mean(rewards))
    std = jnp.where(full, jnp.std(buffer, axis=1)[labels], jnp.std(rewards))
    return Tracker(buffer, seen), mean, std + LABEL_EPS


def advantages(rewards: jax.Array, kind: str, lam: Any, clip: float, labels: Any = None,
               tracker: Any = None) -> tuple[jax.Array, Any]:
    """(advantages [B], the tracker after the round): λ R (raw: the tracker as given), or λ clip((R − μ)/σ,
    −clip, clip) (normalized) with μ, σ of `track` given a tracker and the paths' labels, else the
    round's mean and std + 1e-8. kind ∈ ppo.ADVANTAGES."""
    if kind == "raw":
        return lam * rewards, tracker
    if tracker is None:
        mean, std = jnp.mean(rewards), jnp.std(rewards) + BATCH_EPS
    else:
        tracker, mean, std = track(tracker, labels, rewards)
    return lam * jnp.clip((rewards - mean) / std, -clip, clip), tracker


def clipped_surrogate(ratio: jax.Array, advantage: jax.Array, clip_range: float) -> jax.Array:
    """PPO's min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) [B] (Schulman et al. 2017, eq. 7; DDPO_IS)."""
    return jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - clip_range, 1 + clip_range) * advantage)


def old_means(policy: Policy, params: Any, states: jax.Array, labels: Any) -> jax.Array:
    """m_θ(x_k, k) [n, B, ...] of the states [n + 1, B, ...] (stop-gradient): n forward passes of θ's
    network, one step after another."""
    ks = jnp.arange(states.shape[0] - 1)
    means = jax.lax.map(lambda xk: policy.mean(params, *xk, labels)[0], (states[:-1], ks))
    return jax.lax.stop_gradient(means)


def minibatch(batch: Batch, rows: jax.Array) -> Batch:
    """The paths `rows` [b] of `batch`."""
    return Batch(batch.states[:, rows], batch.means[:, rows], batch.advantages[rows],
                 None if batch.labels is None else batch.labels[rows])


def policy_gradient(policy: Policy, params: Any, batch: Batch, clip_range: float,
                    first: Any = False) -> tuple[Any, Diagnostics]:
    """(∇L(θ) as a pytree like params, its Diagnostics) of one update on `batch` (module docstring's L).
    Where θ is θ_old (batch.means None, or `first`: the round's first update) the old means are θ's own,
    stop-gradient, so every ρ_k is exactly 1; otherwise batch.means. Sum over the steps of one vjp each
    (a `lax.scan`: the memory of one step's activations): n forward and n backward passes of θ's network
    on the batch's paths, and n forward passes of θ0's with a KL term."""

    d = math.prod(batch.states.shape[2:])  # coordinates of one state

    def step_loss(p, x, x_next, stored, k):
        mean, std, kl = policy.moments(p, x, k, batch.labels)
        own = jax.lax.stop_gradient(mean)
        old = own if stored is None else jnp.where(first, own, stored)
        log_rho = log_ratio(x_next, mean, old, std) / d  # per coordinate, as ddpo-pytorch's log-probabilities
        ratio = jnp.exp(log_rho)
        loss = jnp.mean(kl - d * clipped_surrogate(ratio, batch.advantages, clip_range))
        stats = (jnp.mean(jnp.abs(ratio - 1) > clip_range), 0.5 * jnp.mean(log_rho ** 2))
        return loss, Diagnostics(*(jax.lax.stop_gradient(v).astype(x.dtype) for v in stats))

    def body(total, xs):
        g, stats = jax.grad(step_loss, has_aux=True)(params, *xs)
        return jax.tree.map(jnp.add, total, (g, stats)), None

    n = batch.states.shape[0] - 1
    zeros = (jax.tree.map(jnp.zeros_like, params), Diagnostics(*jnp.zeros((2,), batch.states.dtype)))
    xs = (jax.lax.stop_gradient(batch.states[:-1]), jax.lax.stop_gradient(batch.states[1:]), batch.means, jnp.arange(n))
    (grad, stats), _ = jax.lax.scan(body, zeros, xs)
    return grad, Diagnostics(*(v / n for v in stats))
