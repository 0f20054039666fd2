"""Runs a method's outer steps for all seeds at once (`runner` makes a method a unit of the run loop).

One jitted function `vmap`s over seeds a `lax.scan` over logging intervals of a `lax.scan` over
outer steps; outer step k of seed s uses key fold_in(keys[s], k), so a run is the same whatever
the chunks it is cut into (resume, checkpoint cadence). The host sees one snapshot per logged step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli.langevin.methods import LangevinState


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

