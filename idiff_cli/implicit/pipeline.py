"""The pipelined adjoint (beyond the paper): a second queue, of adjoint states, advanced in step with
the forward queue of Algorithm 2, so that an outer step costs a constant number of batched network
calls whatever T.

Algorithm 2 with the full adjoint walks the completed slot back through all T steps in every outer
step: T sequential vjps. Here the walk is spread over M outer steps, like the forward sampling: the
adjoint queue holds M completed paths, slot j (0 = newest) already walked back j·L steps (L = T/M),
with its adjoint state (a = ∂J/∂x at its position, g = the ∂J/∂θ gathered so far). One outer step

  1. forward wave: every forward slot advances L steps under θ_k (queue.queue_advance);
  2. backward wave: every adjoint slot walks back L steps under θ_k (adjoint.walk_paths), and
     the slot the forward queue completed in the previous outer step starts its adjoint (the terminal
     gradient of −λR(denoise_θ(x_T))) — independent of the walk, so it runs in the same wave;
  3. the oldest adjoint slot has reached x_0: its g is this step's Γ; the queue shifts.

The two waves depend only on θ_k, so with M = T (L = 1) the critical path is 2 batched calls per
outer step against 2T + 1 for `nested` (methods.Cost), for the same network passes. The price is
staleness: Γ at step k comes from a path finished M + 1 steps earlier, whose vjps were taken under
the θ of the steps since. With θ frozen the pipelined Γ equals the full adjoint of the same path
exactly (tests/test_implicit_pipeline.py).

Key indices: the M + 1 warm paths sampled under θ0 at start-up take slot keys 0..M (they fill the
adjoint queue), the forward queue's slots start at M + 1, so the i-th Γ (i = 1, 2, ...) always comes
from the path of slot key i − 1, as in the full-adjoint `implicit` method.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from idiff_cli.implicit import queue as queue_lib
from idiff_cli.implicit.adjoint import AdjointState, Step, Terminal, Transition, adjoint_start, rollout, walk_paths


class AdjointQueue(NamedTuple):
    """M completed paths being walked back, newest first, and the path waiting to start.

    states: [M, T + 1, B, ...]; keys: [M]; adj: AdjointState with a leading M axis (slot j at
    position T − j·L); pending_states: [T + 1, B, ...] and pending_key: completed last outer step."""

    states: jax.Array
    keys: jax.Array
    adj: AdjointState
    pending_states: jax.Array
    pending_key: jax.Array


def backward_wave(transition: Transition, params: Any, aq: AdjointQueue, terminal: Terminal, M: int, T: int,
                  batched: bool | None = None, walk: Callable = walk_paths) -> tuple[AdjointQueue, AdjointState]:
    """Walks every slot back L steps and starts the pending path; returns the queue with the pending
    path as slot 0 (its `pending_*` left for the caller to replace) and the finished oldest slot's
    adjoint (its g is dJ/dθ of that path's batch).

    `batched` (default: not on CPU): the slots are walked in one vmapped call, the critical path of
    the design; otherwise one after another (`lax.map`), the same work. Vmapped, the per-slot weight
    gradients become grouped convolutions, which XLA:CPU runs slower than the same convolutions one
    slot at a time (measured: docs/results.md, "Canonical-gradient convolutions").
    `walk`: adjoint.walk_paths, or one with its signature (per_device.walk_per_device)."""
    L = T // M
    batched = jax.default_backend() != "cpu" if batched is None else batched

    first = T - (jnp.arange(M) + 1) * L  # slot j walks back steps first_j .. first_j + L − 1
    windows = jax.vmap(lambda states, f: jax.lax.dynamic_slice_in_dim(states, f, L + 1, axis=0))(aq.states, first)
    walked = walk(transition, params, windows, aq.keys, aq.adj, first, batched)
    _, start = adjoint_start(terminal, params, aq.pending_states[-1], aq.pending_key)

    def shift(new, old):
        return jnp.concatenate([new[None], old[:-1]])

    finished = jax.tree.map(lambda x: x[-1], walked)
    adj = jax.tree.map(shift, start, walked)
    return aq._replace(states=shift(aq.pending_states, aq.states), keys=shift(aq.pending_key, aq.keys),
                       adj=adj), finished


def adjoint_queue_init(step: Step, transition: Transition, params: Any, key: jax.Array, init, terminal: Terminal,
                       M: int, T: int, walk: Callable = walk_paths) -> AdjointQueue:
    """The warm adjoint queue: M + 1 paths of slot keys 0..M sampled under θ0 (one vmapped rollout),
    then M backward waves under θ0 fill it (slot j = key M − 1 − j walked back j·L steps, key M
    pending). Empty slots are walked too, on zeros: wasted work, but one wave. The waves are one
    `lax.scan`, so the warm-up traces (and compiles) the wave once and runs inside a caller's jit."""
    keys = jax.vmap(lambda i: queue_lib.slot_key(key, i))(jnp.arange(M + 1))
    paths = jax.vmap(lambda k: rollout(step, params, init(k), k, T))(keys)  # [M + 1, T + 1, B, ...]
    adj = jax.eval_shape(lambda x: adjoint_start(terminal, params, x, keys[0])[1], paths[0, -1])  # shapes only: no pass
    aq = AdjointQueue(jnp.zeros((M,) + paths.shape[1:], paths.dtype), jnp.stack([keys[0]] * M),
                      jax.tree.map(lambda x: jnp.zeros((M,) + x.shape, x.dtype), adj), paths[0], keys[0])

    def wave(aq, pending):
        states, slot = pending
        aq = backward_wave(transition, params, aq, terminal, M, T, walk=walk)[0]
        return aq._replace(pending_states=states, pending_key=slot), None

    return jax.lax.scan(wave, aq, (paths[1:], keys[1:]))[0]
