"""Policy-gradient finetuning: the denoising chain as a Markov decision process (DDPO, Black et al. 2023,
§4.2-4.3; with the KL term of DPOK, Fan et al. 2023, §4.1).

A stochastic sampler (Euler–Maruyama, DDPM ancestral: a samplers.GaussianStep) makes the path
x_0 → x_1 → … → x_n by Gaussian transitions whose variance v_k does not depend on θ:

    π_θ(x_{k+1} | x_k) = N(x_{k+1}; m_θ(x_k, k), v_k I),   m_θ and √v_k from the step's `moments`.

The image y = D(x_n) (the Tweedie step, or x_n itself) gets the reward R(y), a black box: DDPO needs
no ∇R, so non-differentiable rewards work. With the likelihood-ratio identity
∇_θ E[R] = E[R(y) Σ_k ∇_θ log π_θ(x_{k+1} | x_k)] (DDPO §4.3, "DDPO_SF") and PPO's clipped importance
ratios ρ_k = π_θ(x_{k+1} | x_k)/π_θold(x_{k+1} | x_k) for batches sampled under θ_old (DDPO §4.3,
"DDPO_IS"; Schulman et al. 2017), the loss of one update on a stored batch is

    L(θ) = mean_b Σ_k [ −min(ρ_k^b A^b, clip(ρ_k^b, 1 − ε, 1 + ε) A^b) + β KL_k(θ; x_k^b) ],
    KL_k(θ; x) = ‖m_θ(x, k) − m_θ0(x, k)‖² / (2 v_k)   (the Girsanov increment of girsanov.py),

with advantages A = λ R (raw) or A = λ (R − mean_b R)/(std_b R + 1e-8) (normalised per batch,
DDPO's per-batch statistics). Where θ = θ_old (the update that samples the batch), ρ_k = 1 and ∇L is
the score-function estimate −mean_b A^b Σ_k ∇ log π_θ(x_{k+1}^b | x_k^b) + β mean_b Σ_k ∇KL_k: with
raw advantages its expectation is −λ ∇E[R] (tests/test_ddpo.py). DDPO averages over the steps; the
sum keeps that expectation and the weights λ, β of F = −λ E R + β KL(P_θ ‖ P_θ0) as the other methods
have them (Adam's steps do not depend on a constant factor).

**The KL term's gradient.** E_{P_θ}[Σ_k KL_k(θ; x_k)] is the path KL(P_θ ‖ P_θ0); its gradient is

    E[Σ_k ∇_θ KL_k(θ; x_k)]  (pathwise: θ in the transition at the sampled state)
    + E[(Σ_k KL_k(θ; x_k)) Σ_k ∇_θ log π_θ(x_{k+1} | x_k)]  (score function: θ in the law of the states).

L's KL term gives the first part alone, at the stored states (held fixed: stop-gradient data); the
score-function part is left out, as DPOK's gradient of its per-step KL regulariser does (DPOK §4.1, Algorithm 1).
With more than one update per batch the states are θ_old's.

**What the estimator leaves out.** Only θ's part in the Gaussian transitions' means is differentiated.
The final Tweedie step D_θ (and a step without noise, v_k = 0: DDPM's last step into x_0) is a
deterministic map of θ, not a transition of the MDP: its θ-dependence, E[∇_θ R(D_θ(x_n))], is not in
the gradient (it needs ∇R). With `--final-step none` the reward sees x_n and the estimator is unbiased
for ∇E[R(x_n)].

**Log-ratios in float32.** log ρ_k is computed from the two means, not as a difference of two
log-probabilities: with x' = x_{k+1}, log ρ = (‖x' − m_old‖² − ‖x' − m_θ‖²)/(2v) = ⟨m_θ − m_old,
2x' − m_θ − m_old⟩/(2v), an expression that is exactly 0 at m_θ = m_old, while each log-probability
is a sum of d = H·W·C terms whose float32 rounding (~1e-5 for MNIST) is the size of a clip range. So
a batch keeps the old *means* m_θold(x_k) [n, B, ...] rather than old log-probabilities.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from idiff_cli.implicit import girsanov

NORMALIZE_EPS = 1e-8  # DDPO's (r − mean)/(std + 1e-8)


class Policy(NamedTuple):
    """The sampler's chain under θ as a policy. moments(params, x_k [B, ...], k, slot_key) -> (m_θ(x_k, k)
    [B, ...], √v_k [] or [B], β × KL_k(θ; x_k) [B] or zeros), one evaluation of θ's network (and of θ0's
    with a KL term) under the conditioning of the batch's slot key; lam: λ, the weight of the reward in
    the advantages (may be traced)."""

    moments: Callable
    lam: Any


class Batch(NamedTuple):
    """A batch sampled under θ_old: states x_0..x_n [n + 1, B, ...], the old means m_θold(x_k, k)
    [n, B, ...] (filled by the batch's first update), advantages [B] (λ included), the rewarded
    images [B, H, W, C] and the slot key that named its noise and conditioning (paths.py)."""

    states: jax.Array
    means: jax.Array
    advantages: jax.Array
    images: jax.Array
    key: jax.Array


def gaussian_policy(step_fn: Callable, score: Callable, sde: Any, grid: jax.Array, params0: Any, lam: Any,
                    beta: Any, with_kl: bool) -> Policy:
    """The Policy of a samplers.GaussianStep `step_fn` on `grid` with score(params, x, t, slot_key)
    (paths.score): the step's `moments` at sθ(x_k, t_k) and, with `with_kl`, β × girsanov.transition_kl
    against θ0."""

    def moments(params, x, k, slot_key):
        t, t_next = grid[k], grid[k + 1]
        times = jnp.full((x.shape[0],), t, x.dtype)
        s = score(params, x, times, slot_key)
        mean, std = step_fn.moments(sde, s, x, t, t_next)
        if not with_kl:
            return mean, std, jnp.zeros(x.shape[:1], x.dtype)
        s0 = score(jax.lax.stop_gradient(params0), x, times, slot_key)
        return mean, std, beta * girsanov.transition_kl(step_fn, sde, s, s0, x, t, t_next)

    return Policy(moments, lam)


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


def advantages(rewards: jax.Array, kind: str, lam: Any) -> jax.Array:
    """λ R [B] (raw) or λ (R − mean R)/(std R + 1e-8) (normalized, over the batch): kind ∈ ppo.ADVANTAGES."""
    if kind == "raw":
        return lam * rewards
    return lam * (rewards - jnp.mean(rewards)) / (jnp.std(rewards) + NORMALIZE_EPS)


def clipped_surrogate(ratio: jax.Array, advantage: jax.Array, clip_range: float) -> jax.Array:
    """PPO's min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) [B] (Schulman et al. 2017, eq. 7; DDPO_IS)."""
    return jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - clip_range, 1 + clip_range) * advantage)


def policy_gradient(policy: Policy, params: Any, batch: Batch, fresh: jax.Array, clip_range: float):
    """(∇L(θ) as a pytree like params, the old means [n, B, ...]) for one update on `batch` (module
    docstring's L). With `fresh` (θ is the θ_old that sampled the batch) the old means are θ's own,
    stop-gradient, so every ρ_k is exactly 1; otherwise batch.means. Sum over the steps of one vjp
    each (a `lax.scan`: the memory of one step's activations): n forward and n backward passes of θ's
    network, and n forward passes of θ0's with a KL term."""

    def step_loss(p, x, x_next, stored, k):
        mean, std, kl = policy.moments(p, x, k, batch.key)
        old = jnp.where(fresh, jax.lax.stop_gradient(mean), stored)
        ratio = jnp.exp(log_ratio(x_next, mean, old, std))
        return jnp.mean(kl - clipped_surrogate(ratio, batch.advantages, clip_range)), old

    def body(total, xs):
        g, old = jax.grad(step_loss, has_aux=True)(params, *xs)
        return jax.tree.map(jnp.add, total, g), old

    n = batch.means.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jax.lax.stop_gradient(batch.states[:-1]), jax.lax.stop_gradient(batch.states[1:]), batch.means, jnp.arange(n))
    return jax.lax.scan(body, zeros, xs)
