"""The parts of an outer step that run per device (implicit/per_device.py), on 2 host devices against one
program, on the paper's 1-D Gaussian diffusion (§4) with a KL running cost, in float64.

Each device advances and walks back its own rows; a Gaussian step draws its rows of the whole batch's
noise. So the queue's paths are the one program's to rounding, and the gradients differ only in the
order the devices' sums are added: relative 1e-10 (observed ≈ 1e-16)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.sharding import PartitionSpec

from idiff_cli import sharding
from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.implicit import adjoint, methods, per_device, pipeline
from implicit_gaussian import SDE, finetune_problem, outer_steps, score, theta

BATCH = 6


def problem(T: int, mesh=None):
    """implicit_gaussian's finetuning problem; with a `mesh`, its sampler splits its noise by rows and
    the queue advances and the adjoint walks back per device."""
    if mesh is None:
        return finetune_problem(T, BATCH)[0]
    return finetune_problem(T, BATCH, split_axis=sharding.AXIS, walk=per_device.walk_per_device(mesh),
                            advance=per_device.advance_per_device(mesh))[0]


def test_a_gaussian_step_draws_its_rows_of_the_whole_batch_noise():
    """Under shard_map on 2 devices, a step with split_axis gives the one-device step row for row (the
    same draw, cut: equal to float32 rounding, rtol 1e-6, a few ulps of the two programs' arithmetic,
    which XLA:CPU's elemental emitters, the suite's, contract differently; its default emitters give equal
    bits; another draw would differ by O(1)); without it both devices draw the same noise for their rows."""
    mesh = sharding.mesh_of(2)
    sampler = Sampler(SDE, 4)
    split = dataclasses.replace(sampler, step_fn=dataclasses.replace(sampler.step_fn, split_axis=sharding.AXIS))
    bound = lambda y, t: score(theta(0.3, 1.2, jnp.float32), y, t)  # noqa: E731
    x, key = jax.random.normal(jax.random.key(0), (BATCH, 3)), jax.random.key(1)

    def per_device(s):
        rows = PartitionSpec(sharding.AXIS)
        return jax.jit(jax.shard_map(lambda y: s.step(bound, y, 1, key), mesh=mesh, in_specs=rows, out_specs=rows))(x)

    np.testing.assert_allclose(per_device(split), sampler.step(bound, x, 1, key), rtol=1e-6, atol=1e-6)
    t, t_next = sampler.grid[1], sampler.grid[2]
    mean, std = sampler.step_fn.moments(SDE, bound(x, jnp.full((BATCH,), t)), x, t, t_next)
    noise = (per_device(sampler) - mean) / std
    np.testing.assert_allclose(noise[: BATCH // 2], noise[BATCH // 2:], rtol=1e-4)


@pytest.mark.parametrize("adjoint_kind, M, T", [("full", 2, 4), ("pipelined", 4, 4)])
def test_per_device_queue_and_walk_give_the_one_program_gradients(adjoint_kind, M, T):
    """implicit with the full and the pipelined adjoint: the completed paths (to rounding: 1e-12; the
    programs fuse the step's arithmetic differently) and Γ of 2M + 2 outer steps (relative 1e-10),
    2 devices against one program."""
    mesh = sharding.mesh_of(2)
    with enable_x64(True):
        params, key = theta(0.8, 1.3), jax.random.key(5)
        one = outer_steps(methods.make_method("implicit", problem(T), T, M, adjoint_kind), params, key, 2 * M + 2)
        two = outer_steps(methods.make_method("implicit", problem(T, mesh), T, M, adjoint_kind), params, key, 2 * M + 2)
        for i, ((g1, s1), (g2, s2)) in enumerate(zip(one, two)):
            np.testing.assert_allclose(s2, s1, rtol=1e-12, atol=1e-14, err_msg=f"step {i + 1}")
            for name in ("m", "c"):
                np.testing.assert_allclose(g2[name], g1[name], rtol=1e-10, err_msg=f"step {i + 1}")


def test_per_device_wave_batched_or_one_slot_at_a_time_is_the_same():
    """The pipelined backward wave per device, its slots vmapped (accelerators) or walked one after
    another (CPU), against the one program's wave: the same adjoint states to relative 1e-10."""
    M, T = 2, 4
    mesh = sharding.mesh_of(2)
    with enable_x64(True):
        base, split = problem(T), problem(T, mesh)
        aq = pipeline.adjoint_queue_init(base.paths.step, base.transition, theta(0.5, 1.0), jax.random.key(8),
                                         base.paths.init, base.terminal, M, T)
        new = theta(-0.4, 0.9)
        reference = pipeline.backward_wave(base.transition, new, aq, base.terminal, M, T, False)
        for batched in (True, False):
            wave = jax.jit(lambda aq: pipeline.backward_wave(split.transition, new, aq, split.terminal, M, T, batched,
                                                             walk=split.walk))(aq)
            for a, b in zip(jax.tree.leaves(wave), jax.tree.leaves(reference)):
                if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                    a, b = jax.random.key_data(a), jax.random.key_data(b)
                np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=f"batched={batched}")


def test_walk_paths_is_the_walk_of_each_path():
    """adjoint.walk_paths of 3 paths, mapped or vmapped, is adjoint_walk of each (relative 1e-12)."""
    T = 4
    with enable_x64(True):
        prob = problem(T)
        params = theta(0.8, 1.3)
        keys = jax.vmap(jax.random.key)(jnp.arange(3))
        states = jax.vmap(lambda k: adjoint.rollout(prob.paths.step, params, prob.paths.init(k), k, T))(keys)
        start = jax.vmap(lambda x, k: adjoint.adjoint_start(prob.terminal, params, x, k)[1])(states[:, -1], keys)
        first = jnp.zeros(3, jnp.int32)
        for batched in (False, True):
            walked = adjoint.walk_paths(prob.transition, params, states, keys, start, first, batched)
            for i in range(3):
                one = adjoint.adjoint_walk(prob.transition, params, states[i], keys[i],
                                           jax.tree.map(lambda x: x[i], start))
                for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], walked)), jax.tree.leaves(one)):
                    np.testing.assert_allclose(a, b, rtol=1e-12)
