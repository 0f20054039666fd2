"""The queue of Algorithm 2 (paper §3.3, Fig. 3): M batches at M stages of a T-step sampler.

Slot m (0 = newest) has done m·L steps, L = T / M. One outer step advances every slot by L steps in
one batched call under the current θ (the slots are `vmap`ped, so the network sees M·B images per
call); the oldest slot is then complete (T steps) and is handed to the gradient estimator Γ, and a new
slot starts from fresh noise. Each slot keeps its key and its stored states x_0..x_T, so the adjoint
can regenerate its noise and walk back along its path.

Slot keys: the i-th slot ever started uses `fold_in(key, i)`; with θ frozen, the i-th completed slot is
exactly `rollout(step, θ, init(fold_in(key, i)), fold_in(key, i), T)`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from idiff_cli.errors import UserError
from idiff_cli.implicit.adjoint import Step, rollout


class Queue(NamedTuple):
    """M slots, newest first. states: [M, T + 1, B, ...] (slot m holds x_0..x_{m·L}); keys: [M] slot
    keys; started: scalar int, the number of slots started so far (the next slot's key index)."""

    states: jax.Array
    keys: jax.Array
    started: jax.Array


class Completed(NamedTuple):
    """The slot that finished this outer step: its states [T + 1, B, ...] and key."""

    states: jax.Array
    key: jax.Array


def check_divides(M: int, T: int) -> int:
    """L = T / M, or a one-line UserError when M does not divide T."""
    if M < 1 or T < 1 or T % M:
        raise UserError(f"--M {M} must divide --T {T} (each outer step advances every slot by T/M steps); "
                        f"valid --M for T={T}: {', '.join(str(m) for m in range(1, T + 1) if T % m == 0)}")
    return T // M


def slot_key(key: jax.Array, index: jax.Array) -> jax.Array:
    return jax.random.fold_in(key, index)


def queue_init(step: Step, params: Any, key: jax.Array, init: Callable[[jax.Array], jax.Array],
               M: int, T: int, first: int = 0) -> Queue:
    """The warm queue P_M of Algorithm 2: slot m pre-advanced m·L steps under `params` (θ0).

    `init(slot_key) -> x_0` draws a slot's starting noise. Slot m gets key index first + M − 1 − m, so
    slots complete in the order of their key indices (`first` > 0 when earlier indices are already
    taken, as by the pipelined adjoint's warm paths). Cost: M(M − 1)/2 · L steps of one batch.
    """
    L = check_divides(M, T)
    keys = jax.vmap(lambda i: slot_key(key, i))(first + M - 1 - jnp.arange(M))
    x0 = jax.vmap(init)(keys)
    template = jnp.zeros((T + 1,) + x0.shape[1:], x0.dtype)
    slots = []
    for m in range(M):  # warm-up only: slot m runs m·L steps
        path = rollout(step, params, x0[m], keys[m], m * L)
        slots.append(template.at[: m * L + 1].set(path))
    return Queue(jnp.stack(slots), keys, jnp.asarray(first + M, jnp.int32))


def queue_advance(step: Step, params: Any, queue: Queue, M: int, T: int) -> tuple[Queue, Completed]:
    """Advances every slot by L = T/M steps under `params` in one vmapped scan; returns the queue with
    slot m now at stage m + 1 and the oldest slot, which is complete."""
    L = T // M

    def advance(states, key, m):
        x = jax.lax.dynamic_index_in_dim(states, m * L, keepdims=False)
        path = rollout(step, params, x, key, L, first=m * L)
        return jax.lax.dynamic_update_slice_in_dim(states, path[1:], m * L + 1, axis=0)

    states = jax.vmap(advance)(queue.states, queue.keys, jnp.arange(M))
    return queue._replace(states=states), Completed(states[-1], queue.keys[-1])


def queue_push(queue: Queue, key: jax.Array, init: Callable[[jax.Array], jax.Array]) -> Queue:
    """Drops the completed oldest slot and starts a new slot at stage 0 from fresh noise."""
    new_key = slot_key(key, queue.started)
    fresh = jnp.zeros_like(queue.states[0]).at[0].set(init(new_key))
    return Queue(jnp.concatenate([fresh[None], queue.states[:-1]]),
                 jnp.concatenate([new_key[None], queue.keys[:-1]]), queue.started + 1)
