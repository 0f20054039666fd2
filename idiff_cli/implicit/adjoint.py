"""Gradients of a per-path objective through a T-step sampler: the adjoint method (talk file, §"Example:
Denoising diffusions"; paper §3.2, §5.2).

A sampler is seen through one bound step, `step(params, x, k, key) -> x_{k+1}`: step k of the time grid,
its noise regenerated from `key` (so adjoints never store noise). The objective of one batch is

    J(θ) = mean_b [ terminal(θ, x_n^b, key) + Σ_{k<n} running(θ, x_k^b, k) ],

e.g. terminal = −λ R(x) or −λ R(denoise_θ(x), prompts(key)) (reward; the key names the path's conditioning
as it names its noise) and running = β × the Girsanov KL increment
(girsanov.py). The gradients differentiate a *transition* (params, x_k, k, key) -> (x_{k+1},
running cost of x_k [B]): `transition(step, running)` pairs any two functions, and
girsanov.kl_transition computes both from one score evaluation, so one vjp per step covers both.

* `discrete_adjoint` is the exact gradient of J for the discretised sampler (Euler–Maruyama or any
  other step): a reverse `lax.scan` of `jax.vjp` of one transition over the stored states x_0..x_n. Only
  the states are kept; the network's activations are recomputed one step at a time, so memory is
  the states plus one step's activations, whatever n.
* `continuous_adjoint` integrates the adjoint ODE system of the probability-flow ODE backwards from
  x_n alone (Z, A, G of the talk file): dZ = −μ dt, dA = Aᵀ∂ₓμ dt, dG = Aᵀ∂θμ dt, with the
  sampler's own Euler increments μ h = step(θ, z, k) − z. It needs no stored states and converges to
  the discrete adjoint as the grid is refined.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Step = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # (params, x, k, key) -> x_next
Running = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, x, k) -> [B] cost of state x_k
Terminal = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, x_n, key) -> [B] cost of the final state
Transition = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # -> (x_next, [B])


def transition(step: Step, running: Optional[Running] = None) -> Transition:
    """(params, x_k, k, key) -> (step(params, x_k, k, key), running(params, x_k, k) [B], or zeros)."""

    def both(params, x, k, key):
        cost = running(params, x, k) if running is not None else jnp.zeros(x.shape[:1], x.dtype)
        return step(params, x, k, key), cost

    return both


class Gradient(NamedTuple):
    """dJ/dθ (a pytree like params), dJ/dx at the first state of the window (for chaining), and the
    batch means of the terminal cost and of the running cost summed over the window (0 without one)."""

    params: Any
    x: jax.Array
    terminal: jax.Array
    running: jax.Array


def rollout(step: Step, params: Any, x0: jax.Array, key: jax.Array, n_steps: int, first: int = 0) -> jax.Array:
    """States [n_steps + 1, *x0.shape] of steps first .. first + n_steps − 1 of the sampler from x0."""

    def body(x, k):
        x_next = step(params, x, k, key)
        return x_next, x_next

    _, xs = jax.lax.scan(body, x0, first + jnp.arange(n_steps))
    return jnp.concatenate([x0[None], xs])


def terminal_gradient(terminal: Terminal, params: Any, x_final: jax.Array, key: jax.Array):
    """(mean_b terminal, its ∂/∂θ, A_0 = its ∂/∂x_n) of the path named by `key`."""
    value, (g, a) = jax.value_and_grad(lambda p, x: jnp.mean(terminal(p, x, key)), argnums=(0, 1))(params, x_final)
    return value, g, a


class AdjointState(NamedTuple):
    """The adjoint of a path part-way back: a = ∂J/∂x_k [B, ...] at the current state, g = the
    ∂J/∂θ gathered so far (a pytree like params), running = the batch-mean running cost gathered so far."""

    a: jax.Array
    g: Any
    running: jax.Array


def adjoint_start(terminal: Terminal, params: Any, x_final: jax.Array,
                  key: jax.Array) -> tuple[jax.Array, AdjointState]:
    """(mean_b terminal(θ, x_n, key), the adjoint at x_n: a = ∂/∂x_n, g = ∂/∂θ of the terminal cost)."""
    value, g, a = terminal_gradient(terminal, params, x_final, key)
    return value, AdjointState(a, g, jnp.zeros((), a.dtype))


def adjoint_walk(transition: Transition, params: Any, states: jax.Array, key: jax.Array, adj: AdjointState,
                 first: jax.Array | int = 0, batch: Optional[int] = None) -> AdjointState:
    """Walks the adjoint back through the steps first .. first + n − 1 that made states [n + 1, B, ...]:
    a ← (∂_x step_k)ᵀ a + ∂_x running_k, g ← g + (∂_θ step_k)ᵀ a + ∂_θ running_k, for k from the last
    down to `first` (a reverse `lax.scan` of one `jax.vjp` of the transition; `first` may be traced).
    J holds the mean of the running cost over `batch` rows (default B; rows of a larger batch walked
    apart pass its size)."""
    n = states.shape[0] - 1
    weight = 1.0 / (batch or states.shape[1])

    def body(carry, inputs):
        a, g, total = carry
        x, k = inputs
        (_, cost), vjp = jax.vjp(lambda p, y: transition(p, y, k, key), params, x)
        g_step, a_step = vjp((a, jnp.full_like(cost, weight)))
        return AdjointState(a_step, jax.tree.map(jnp.add, g, g_step), total + weight * jnp.sum(cost)), None

    adj, _ = jax.lax.scan(body, adj, (states[:-1], first + jnp.arange(n)), reverse=True)
    return adj


def walk_paths(transition: Transition, params: Any, states: jax.Array, keys: jax.Array, adj: AdjointState,
               first: jax.Array, batched: bool = False, batch: Optional[int] = None) -> AdjointState:
    """`adjoint_walk` of S paths: states [S, n + 1, B, ...], keys [S], adj and first with a leading S
    axis; the paths walked one after another (`lax.map`) or, `batched`, in one vmapped walk."""

    def one(path):
        states, key, adj, first = path
        return adjoint_walk(transition, params, states, key, adj, first, batch)

    paths = (states, keys, adj, first)
    return jax.vmap(one)(paths) if batched else jax.lax.map(one, paths)


def discrete_adjoint(transition: Transition, params: Any, states: jax.Array, key: jax.Array, terminal: Terminal,
                     first: int = 0, walk: Callable = walk_paths) -> Gradient:
    """Exact reverse-mode gradient of J through the steps first .. first + n − 1 that made `states`.

    Args:
      transition: (params, x_k, k, key) -> (x_{k+1}, running cost [B]); the batch mean of the running
        cost enters J for first <= k < first + n.
      states: [n + 1, B, ...] the stored x_first .. x_{first+n}.
      terminal: the cost of the final state states[-1], given the path's key.
      first: global index of states[0] on the time grid (truncated backprop starts the window late).
      walk: `walk_paths`, or one with its signature (per_device.walk_per_device), given this one path.
    Cost: n vjps of one transition; memory: the states and one step's activations.
    """
    value, adj = adjoint_start(terminal, params, states[-1], key)
    one = lambda x: x[None]  # noqa: E731
    adj = walk(transition, params, one(states), one(key), jax.tree.map(one, adj), one(jnp.asarray(first)))
    adj = jax.tree.map(lambda x: x[0], adj)
    return Gradient(adj.g, adj.a, value, adj.running)


def continuous_adjoint(step: Step, params: Any, x_final: jax.Array, key: jax.Array, terminal: Terminal,
                       n_steps: int) -> Gradient:
    """Adjoint ODE system of a deterministic sampler (probability flow), integrated backwards by Euler.

    With the sampler's increment δ_k(θ, z) = step(θ, z, k) − z = μ(t_k, z, θ) h_k, one backward step is
        z ← z − δ_k(θ, z),   a ← a + (∂_z δ_k)ᵀ a,   g ← g + (∂_θ δ_k)ᵀ a,
    started at (z, a, g) = (x_n, ∂J/∂x_n, ∂J/∂θ|_terminal). Terminal cost only (a path-KL needs noise: Girsanov).
    Returns the estimate of dJ/dθ and of dJ/dx_0 (at the reconstructed z_0).
    """

    def body(carry, k):
        z, a, g = carry
        delta, vjp = jax.vjp(lambda p, y: step(p, y, k, key) - y, params, z)
        g_step, a_step = vjp(a)
        return (z - delta, a + a_step, jax.tree.map(jnp.add, g, g_step)), None

    value, g_final, a_final = terminal_gradient(terminal, params, x_final, key)
    (z, a, g), _ = jax.lax.scan(body, (x_final, a_final, g_final), jnp.arange(n_steps), reverse=True)
    return Gradient(g, a, value, jnp.zeros((), a.dtype))


def unrolled_gradient(transition: Transition, params: Any, x0: jax.Array, key: jax.Array, n_steps: int,
                      terminal: Terminal, remat: bool = True, with_states: bool = False) -> Any:
    """dJ/dθ by `jax.grad` through the unrolled sampler (AlignProp-like `full-backprop`); with `remat`,
    each step is `jax.checkpoint`ed so only the states are kept, as in the adjoint. With `with_states`,
    returns (dJ/dθ, states [n + 1, ...]) of the forward pass."""
    one = jax.checkpoint(transition) if remat else transition

    def objective(p):
        def body(carry, k):
            x, cost = carry
            x_next, step_cost = one(p, x, k, key)
            return (x_next, cost + jnp.mean(step_cost)), x_next

        (x, cost), xs = jax.lax.scan(body, (x0, jnp.zeros((), x0.dtype)), jnp.arange(n_steps))
        return jnp.mean(terminal(p, x, key)) + cost, jnp.concatenate([x0[None], xs])

    grad, states = jax.grad(objective, has_aux=True)(params)
    return (grad, states) if with_states else grad
