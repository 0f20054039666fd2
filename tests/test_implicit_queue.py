"""Invariants of the queue of Algorithm 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli.errors import UserError
from idiff_cli.implicit import queue as q
from idiff_cli.implicit.adjoint import rollout
from implicit_gaussian import paths, score, theta

T, M, BATCH = 8, 4, 5


def test_frozen_theta_queue_gives_plain_samples_with_the_same_keys():
    """With θ frozen, the i-th completed slot is `Sampler.sample` with key fold_in(key, i), and its stored
    states are the plain rollout's; every slot is at the stage its index says. The same draws through two
    programs: equal to float32 rounding (rtol 1e-6: a few ulps, as XLA:CPU's elemental emitters, the
    suite's, contract one program's multiply-adds otherwise than the other's; its default emitters give
    equal bits), where another key's draws would differ by O(1)."""
    sampler, p = paths(T, BATCH)
    params, key = theta(0.7, 1.0, jnp.float32), jax.random.key(3)
    queue = q.queue_init(p.step, params, key, p.init, M, T)
    advance = jax.jit(lambda queue: q.queue_advance(p.step, params, queue, M, T))
    push = jax.jit(lambda queue: q.queue_push(queue, key, p.init))
    plain = jax.jit(lambda k: sampler.sample(lambda y, t: score(params, y, t), k, (BATCH, 1)))
    plain_states = jax.jit(lambda k: rollout(p.step, params, p.init(k), k, T))
    for i in range(6):
        queue, done = advance(queue)
        k = q.slot_key(key, i)
        np.testing.assert_allclose(done.states[-1], plain(k), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(done.states, plain_states(k), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(jax.random.key_data(done.key), jax.random.key_data(k))
        queue = push(queue)
        L = T // M
        for m in range(M):  # slot m: states filled up to m·L, zeros after
            filled = np.abs(np.asarray(queue.states[m])).reshape(T + 1, -1).sum(axis=1) > 0
            assert filled[: m * L + 1].all() and not filled[m * L + 1:].any()


def test_queue_uses_the_current_theta_for_every_slot():
    """Changing θ between outer steps changes every slot's next L steps (one batched call under θ_k):
    after advancing under θ', each slot's new states equal the rollout under θ' from its previous state."""
    _, p = paths(T, BATCH)
    key = jax.random.key(4)
    queue = q.queue_init(p.step, theta(0.7, 1.0, jnp.float32), key, p.init, M, T)
    new = theta(-1.0, 1.0, jnp.float32)
    advanced, _ = q.queue_advance(p.step, new, queue, M, T)
    L = T // M
    for m in range(M):
        expect = rollout(p.step, new, queue.states[m, m * L], queue.keys[m], L, first=m * L)
        np.testing.assert_allclose(advanced.states[m, m * L: (m + 1) * L + 1], expect, rtol=1e-6, atol=1e-6)


def test_M_must_divide_T():
    with pytest.raises(UserError, match=r"--M 3 must divide --T 8.*valid --M for T=8: 1, 2, 4, 8"):
        q.check_divides(3, 8)
    assert q.check_divides(4, 64) == 16
