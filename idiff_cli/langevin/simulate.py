"""Runs a method's outer steps for all seeds at once, and a method as a resumable unit of the run loop.

One jitted function `vmap`s over seeds a `lax.scan` over logging intervals of a `lax.scan` over
outer steps; outer step k of seed s uses key fold_in(keys[s], k), so a run is the same whatever
the chunks it is cut into (resume, checkpoint cadence). The host sees one snapshot per logged step.

A method's unit state is {"chains": the vmapped LangevinState (seed axis sharded over the local
devices), "history": host arrays of the logged steps}; the experiment's `record` fills the history
and returns the metrics rows. The history's per-log arrays have one entry per logged step of the
run so far, and grow with `--steps`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.checkpoint import Checkpointer
from idiff_cli.langevin.methods import LangevinState, Method
from idiff_cli.loop import Unit, logged_steps, segments_of
from idiff_cli.parallel import seed_mesh, shard_leading

# record(history, steps [c], x [c, S, d, B], θ [c, S, ...], statistic [c, S]) -> (history, rows)
Record = Callable[[dict, np.ndarray, np.ndarray, Any, np.ndarray], tuple[dict, list[dict]]]


@functools.lru_cache(maxsize=64)  # the same update function compiles once per (interval, count)
def _segment_fn(update: Callable, statistic: Callable, every: int, count: int) -> Callable:
    """jit(vmap over seeds): `count` intervals of `every` outer steps; emits (x, θ, statistic(x)) after each."""

    def one_seed(state: LangevinState, key: jax.Array, first_step: jax.Array):
        def interval(state, c):
            def body(s, k):
                return update(s, jax.random.fold_in(key, k)), None

            state, _ = jax.lax.scan(body, state, first_step + c * every + jnp.arange(every))
            return state, (state.x, state.theta, statistic(state.x))

        return jax.lax.scan(interval, state, jnp.arange(count))

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None)))


def advance(update: Callable, statistic: Callable, state: LangevinState, keys: jax.Array, step: int, n: int,
            log_every: int) -> tuple[LangevinState, np.ndarray, np.ndarray, Any, np.ndarray]:
    """Outer steps step, …, step + n − 1 of every seed, logged every `log_every` steps and at step + n.

    Returns (state, logged steps [c], x [c, S, d, B], θ [c, S, ...], statistic(x) [c, S]) as host arrays."""
    n_full, rest = divmod(n, log_every)
    plan = ([(log_every, n_full)] if n_full else []) + ([(rest, 1)] if rest else [])
    logs, logged_at, done = [], [], step
    for every, count in plan:
        state, logged = _segment_fn(update, statistic, every, count)(state, keys, done)
        logs.append(jax.tree.map(lambda a: np.swapaxes(np.asarray(a), 0, 1), logged))  # [S, c] -> [c, S]
        logged_at.append(done + every * (1 + np.arange(count)))
        done += every * count
    x, theta, values = jax.tree.map(lambda *a: np.concatenate(a), *logs)
    return state, np.concatenate(logged_at), x, theta, values


def grown(array: np.ndarray, length: int) -> np.ndarray:
    """`array` with its leading axis zero-padded to `length` (a history after `--steps` grew)."""
    if len(array) >= length:
        return array
    return np.concatenate([array, np.zeros((length - len(array),) + array.shape[1:], array.dtype)])


def latest_checkpoint(checkpoints: Any, name: str) -> int:
    """The step of method `name`'s latest checkpoint under the `checkpoints` directory (0: none)."""
    with Checkpointer(checkpoints / name) as ckpt:
        return ckpt.latest_step() or 0


def method_unit(method: Method, x0: jax.Array, theta_start: Any, keys: jax.Array, steps: int, log_every: int,
                statistic: Callable, history: Callable[[int], dict], record: Record,
                first_rows: Callable[[dict, LangevinState], tuple[dict, list[dict]]], checkpoints: Any,
                **unit: Any) -> Unit:
    """The unit of one method: all seeds from x0 [S, d, B] and θ [S, ...], `steps` outer steps.

    history(steps) -> the empty host history of a run of `steps` steps; first_rows(history, state)
    records step 0. Further keyword arguments go to `Unit` (finite, progress, rate, …)."""
    mesh = seed_mesh(len(keys))
    keys = shard_leading(keys, mesh)

    def chains():
        return shard_leading(jax.vmap(method.init)(x0, theta_start), mesh)

    def init():
        return {"chains": chains(), "history": history(steps)}

    def template():
        return {"chains": chains(), "history": history(latest_checkpoint(checkpoints, method.name))}

    def step_rows(state):
        hist, rows = first_rows(state["history"], state["chains"])
        state["history"] = hist
        return rows

    def run(state, step, n):
        hist = jax.tree.map(np.array, state["history"])
        hist = jax.tree.map(lambda a, b: grown(a, len(b)), hist, history(steps))
        chains, logged, x, theta, values = advance(method.update, statistic, state["chains"], keys, step, n,
                                                   log_every)
        hist, rows = record(hist, logged, x, theta, values)
        return {"chains": chains, "history": hist}, rows

    return Unit(steps, init, run, name=method.name, template=template, first_rows=step_rows,
                chunk=segments_of(steps, log_every), **unit)


def log_index(steps: int, log_every: int, step: np.ndarray) -> np.ndarray:
    """Positions of logged `step`s among `logged_steps(steps, log_every)`."""
    return np.searchsorted(logged_steps(steps, log_every), step)
