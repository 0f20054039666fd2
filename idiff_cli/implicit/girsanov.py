"""KL(p ‖ π*(θ0)) between the sampler's path measures under θ and θ0, by Girsanov's theorem (talk file;
paper §5.2, Appendix A.2 "The KL term ... is computed using Girsanov's theorem").

The reverse-time SDE sampled by Euler–Maruyama has drift μθ(x, t) = −f(x, t) + g(t)² sθ(x, t) and
diffusion g(t). Two such processes from the same start differ only in the score, so

    KL(P_θ ‖ P_θ0) = ½ ∫ E_{x∼p_t} ‖μθ − μθ0‖² / g² dt = ½ ∫ g(t)² E ‖sθ(x, t) − sθ0(x, t)‖² dt

(for the paper's OU process, g² = 2: ¼ ∫ E‖μθ − μθ0‖² dt). On the sampler's grid the chain's law is
exact, not a discretisation of this integral: every stochastic step (a `samplers.GaussianStep`) is a
Gaussian transition x_k -> x_{k+1} ~ N(m_θ(x_k), v_k I) whose variance does not depend on θ, so by the
chain rule of KL

    KL_n = Σ_k E ‖m_θ(x_k) − m_θ0(x_k)‖² / (2 v_k)

is the *exact* KL between the two discrete chains, averaged over paths x_0..x_n of the θ-chain. For
Euler–Maruyama (m = x + (½β x + β s) h, v = β h) the increment is ½ h g(t_k)² ‖sθ − sθ0‖², the Riemann
sum of the integral; for DDPM ancestral sampling (ddpm.py, samplers.py) it is b²‖sθ − sθ0‖²/(2 a v_k)
without clipping, and with clipped x̂0 the difference of the two clipped means. A step without noise
(v_k = 0: DDPM's last step from t = 0, or into x_0 with `fixed_small`) is a deterministic θ-dependent
map with no Girsanov term, like the Tweedie step below; it adds 0. Being an expectation over the noise
of a smooth function of (θ, path), the gradient of KL_n is the gradient of the same sum through the
sampler: `kl_running_cost` is a running cost for the adjoints, and `kl_transition` the sampler step and
that cost in one function that evaluates sθ(x_k, t_k) once, for the step and the increment. An adjoint
step is then one vjp: a forward and a backward pass of θ's network, and a forward and a backward pass of
θ0's (θ0's weights are held fixed, but the increment depends on x_k through sθ0).

What it covers: the law of the path x_0 = x_{t_max}, ..., x_n = x_{t_min} made by the n transitions,
nothing after. The sampler's final denoising (Tweedie) step D_θ(x_n) = (x_n + σ² sθ(x_n))/α is
deterministic and depends on θ: it is not a Gaussian transition and has no Girsanov term, so with it
the KL of the rewarded images' law is neither this sum nor bounded by it. When the reward sees x_n
itself (finetune --final-step none), the penalty is exactly the path KL of what is rewarded, and by
data processing it bounds the KL of the rewarded marginal, KL(law of x_n under θ ‖ under θ0).

The logged KL (`fresh_path_kl`) is the same sum along N fresh paths sampled under the current θ from
fixed keys, with the standard error of its mean, std/√N (the sums of independent paths are i.i.d.).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def transition_kl(step_fn: Callable, sde: Any, s: jax.Array, s0: jax.Array, x: jax.Array, t: jax.Array,
                  t_next: jax.Array) -> jax.Array:
    """KL(N(m, v) ‖ N(m0, v)) = ‖m − m0‖²/(2v) per sample [B] between the Gaussian transitions of the step
    `step_fn` (a samplers.GaussianStep: a stochastic sampler's) from x at t to t_next given the score values
    s = sθ(x, t) and s0 = sθ0(x, t), read from the step's `moments`; 0 where the step has no noise (v = 0)."""
    mean, std = step_fn.moments(sde, s, x, t, t_next)
    mean0, _ = step_fn.moments(sde, s0, x, t, t_next)
    var = jnp.broadcast_to(jnp.asarray(std, x.dtype) ** 2, x.shape[:1])
    noisy = var > 0
    squared = jnp.sum(((mean - mean0) ** 2).reshape(x.shape[0], -1), axis=1)
    return jnp.where(noisy, squared / (2 * jnp.where(noisy, var, 1.0)), 0.0)


def kl_increment(step_fn: Callable, score: Callable, sde: Any, params: Any, params0: Any, x: jax.Array,
                 t: jax.Array, t_next: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """`transition_kl` of the step from x at t under θ = params and θ0 = params0: [B] for x of shape [B, ...]."""
    bound = lambda p, y, times: score(p, y, times, labels)  # noqa: E731
    return _increment(bound(params, x, _times(t, x)), step_fn, bound, sde, params0, x, t, t_next)


def _times(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, x.dtype)


def _increment(s: jax.Array, step_fn: Callable, score: Callable, sde: Any, params0: Any, x: jax.Array,
               t: jax.Array, t_next: jax.Array) -> jax.Array:
    """kl_increment given s = sθ(x, t) and score(params, x, times) of the batch's conditioning."""
    s0 = score(jax.lax.stop_gradient(params0), x, _times(t, x))
    return transition_kl(step_fn, sde, s, s0, x, t, t_next)


def kl_running_cost(step_fn: Callable, score: Callable, sde: Any, grid: jax.Array, params0: Any,
                    labels: jax.Array | None = None) -> Callable:
    """(params, x_k, k) -> [B] KL increment of step k of `step_fn` on `grid`, the running cost of the adjoint."""

    def running(params, x, k):
        return kl_increment(step_fn, score, sde, params, params0, x, grid[k], grid[k + 1], labels)

    return running


def kl_transition(paths: Any, sde: Any, grid: jax.Array, params0: Any, beta: float | jax.Array) -> Callable:
    """(params, x_k, k, slot_key) -> (x_{k+1}, β × KL increment of step k [B]): an adjoint.Transition
    whose step and increment share the step's score evaluation (paths.step_and_score; θ0's score under
    the slot's conditioning, paths.labels); `sde` and `grid` are those of the sampler behind `paths`,
    whose step (paths.step_fn) gives the transitions. ValueError when the sampler is not stochastic
    (paths.stochastic): its paths have no Girsanov KL."""
    if not paths.stochastic:
        raise ValueError(f"the Girsanov KL needs the sampler's Gaussian transitions; "
                         f"{getattr(paths.step_fn, '__name__', paths.step_fn)} is deterministic or declares none "
                         "(a samplers.GaussianStep declares its mean and variance)")

    def transition(params, x, k, slot_key):
        x_next, s = paths.step_and_score(params, x, k, slot_key)
        score = lambda p, y, times: paths.score(p, y, times, paths.labels(slot_key))  # noqa: E731
        return x_next, beta * _increment(s, paths.step_fn, score, sde, params0, x, grid[k], grid[k + 1])

    return transition


def path_kl(running: Callable, params: Any, states: jax.Array, first: int = 0) -> jax.Array:
    """Girsanov estimate of KL(P_θ ‖ P_θ0) per sample, [B], summed over the states [n + 1, B, ...]
    of one path (the last state carries no increment)."""
    ks = first + jnp.arange(states.shape[0] - 1)
    return jnp.sum(jax.lax.map(lambda xk: running(params, *xk), (states[:-1], ks)), axis=0)


def fresh_path_kl(transition: Callable, init: Callable[[jax.Array], jax.Array], params: Any, keys: jax.Array,
                  n_steps: int) -> jax.Array:
    """Girsanov KL of fresh paths under θ, per path: [len(keys) · B].

    Batch i starts at init(keys[i]) and takes the n_steps transitions (params, x_k, k, keys[i]) ->
    (x_{k+1}, KL increment [B]) of `kl_transition` with β = 1, which sample x_{k+1} under θ and score
    step k from the same evaluation of sθ(x_k, t_k); the batches run one after another (`lax.map`) and
    keep no states. Cost: `fresh_path_kl_passes`."""

    def one(key):
        def body(carry, k):
            x, total = carry
            x_next, increment = transition(params, x, k, key)
            return (x_next, total + increment), None

        x0 = init(key)
        (_, total), _ = jax.lax.scan(body, (x0, jnp.zeros(x0.shape[:1], x0.dtype)), jnp.arange(n_steps))
        return total

    return jax.lax.map(one, keys).reshape(-1)


def fresh_path_kl_passes(n_steps: int, n_paths: int) -> int:
    """Images through a forward pass in `fresh_path_kl`: per step of each path one of θ's network (the
    step, whose score the increment reuses) and one of θ0's; no backward pass."""
    return 2 * n_steps * n_paths


def mean_and_se(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean of i.i.d. values [N] and its standard error std/√N (std with N − 1 degrees of freedom)."""
    n = values.shape[0]
    return jnp.mean(values), jnp.std(values, ddof=1) / jnp.sqrt(n)
