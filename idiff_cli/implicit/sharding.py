"""The finetune's batch split over the devices of every process (paper §3.3, Fig. 3: one step of the
sampler is applied in parallel to all distributions of the queue).

A 1-D mesh holds the first n local devices of each process. Every image batch the network sees
([B, H, W, C], inside the queue's vmapped slots, the adjoint's vjps, the Girsanov KL's fresh paths
and the grids) is constrained to be split along B over the mesh (`BatchSharded.score`); XLA
partitions the rest of each program from there and reduces the weight gradients across devices
(the batch mean of the reward and of the KL, summed over devices by its own collectives), except in
the discrete adjoint's walk, which each device runs on its own rows under `shard_map`, summing the
weight gradient once at the end (`walk_per_device`). θ, θ0 and
the optimiser state are replicated; the carried paths (a carry leaf ending in [B, H, W, C]) stay
split between outer steps. The random draws do not depend on the split: JAX's partitionable
threefry (`jax_threefry_partitionable`, on by default) draws each element from its index alone.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idiff_cli.errors import UserError
from idiff_cli.implicit import adjoint

AXIS = "batch"


def device_count(batch: int, requested: int | None, local: int, processes: int = 1) -> tuple[int, str]:
    """(n, note): the local devices per process the batch is split over, n · processes dividing
    `batch`. `requested` (--devices) must divide it and exist (else a UserError); without it, every
    local device when they divide the batch, else the largest count that does, with a one-line note."""
    if requested is not None:
        if requested > local:
            raise UserError(f"--devices {requested}: this process has {local} local device(s)")
        if batch % (requested * processes):
            raise UserError(f"--devices {requested} on {processes} process(es) does not divide --batch {batch}; "
                            f"pick --devices among {', '.join(map(str, divisors(batch, local, processes))) or 'none'}")
        return requested, ""
    fits = divisors(batch, local, processes)
    if not fits:
        raise UserError(f"--batch {batch} is not divisible by the {processes} processes; pick a multiple of {processes}")
    n = fits[-1]
    note = "" if n == local else (f"the batch of {batch} is split over {n} of the {local} local devices "
                                  f"(the largest count that divides it; --devices to choose)")
    return n, note


def divisors(batch: int, local: int, processes: int) -> list[int]:
    return [d for d in range(1, local + 1) if batch % (d * processes) == 0]


def mesh_of(n: int) -> Mesh:
    """The first `n` local devices of every process, as one 1-D mesh (process by process)."""
    devices = [d for p in range(jax.process_count()) for d in
               [d for d in jax.devices() if d.process_index == p][:n]]
    return Mesh(np.array(devices), (AXIS,))


class BatchSharded:
    """`model` (a diffusion.model.Model) whose score splits its input batch x [B, ...] over `mesh`;
    every other attribute is the model's. The constraint sits where the work is, the network's
    input, so each method's program (queue waves, adjoints, fresh paths, grids) is partitioned
    along the batch however it builds its batches. Inside `walk_per_device` (the batch axis manual)
    x is one device's rows already: no constraint, and the whole batch's labels are cut to its rows."""

    def __init__(self, model: Any, mesh: Mesh):
        self._model = model
        self.mesh = mesh
        self._sharding = NamedSharding(mesh, PartitionSpec(AXIS))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def score(self, params, x, t, labels=None):
        if AXIS in jax.sharding.get_abstract_mesh().manual_axes:
            if labels is not None and labels.shape[0] != x.shape[0]:
                labels = jax.lax.dynamic_slice_in_dim(labels, jax.lax.axis_index(AXIS) * x.shape[0], x.shape[0])
            return self._model.score(params, x, t, labels)
        return self._model.score(params, jax.lax.with_sharding_constraint(x, self._sharding), t, labels)


def walk_per_device(mesh: Mesh) -> Callable:
    """`adjoint.adjoint_walk` with each device walking its own rows of the batch and the weight gradient
    summed over the devices once, after the walk. Given only the split batch, XLA's partitioner sums it
    in every step, and every step waits for the slower device (benchmarks/sharded_adjoint.py: a 16-step
    walk on 2 host devices 1.03× one device that way, 1.22× this way).

    The transition regenerates its step's noise for this device's rows from the step's key, so the
    rows' noise is not the whole batch's. The walk does not depend on it: the samplers' noise enters
    x_{k+1} additively, and the walk uses only the cotangents of x_{k+1} and the running cost, which
    reads the score at x_k (tests/test_finetune_sharded.py: 2 devices follow 1 device's trajectory)."""
    batch_spec, paths_spec, whole = PartitionSpec(AXIS), PartitionSpec(None, AXIS), PartitionSpec()

    def walk(transition, params, states, key, adj, first=0):
        batch = states.shape[1]

        def rows(params, states, key, a, first):
            start = adjoint.AdjointState(a, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), a.dtype))
            out = adjoint.adjoint_walk(transition, params, states, key, start, first, batch)
            return jax.lax.psum((out.g, out.running), AXIS), out.a

        (g, running), a = jax.shard_map(rows, mesh=mesh, in_specs=(whole, paths_spec, whole, batch_spec, whole),
                                        out_specs=((whole, whole), batch_spec), check_vma=False)(
            params, states, key, adj.a, jnp.asarray(first))
        return adjoint.AdjointState(a, jax.tree.map(jnp.add, adj.g, g), adj.running + running)

    return walk


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(shapes: Any, mesh: Mesh, images: tuple[int, ...]) -> Any:
    """Shardings of a state (its `jax.eval_shape`): a leaf ending in the image batch `images`
    ([B, H, W, C]) split along B, every other leaf replicated."""
    k = len(images)

    def leaf(spec):
        if tuple(spec.shape[-k:]) == tuple(images) and len(spec.shape) >= k:
            return NamedSharding(mesh, PartitionSpec(*([None] * (len(spec.shape) - k)), AXIS))
        return replicated(mesh)

    return jax.tree.map(leaf, shapes)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def put(tree: Any, shardings: Any) -> Any:
    """Values the same on every process (host values, or arrays already on the mesh) as global arrays
    with `shardings`; typed PRNG keys travel as their key data. Arrays spanning several processes are
    resharded by one jitted identity (device_put takes only addressable targets there)."""

    def place(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        if _is_key(x):
            return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    placed = jax.tree.map(place, tree, shardings)
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(placed)):
        return placed
    return jax.jit(lambda t: t, out_shardings=shardings)(placed)


def check_visible(run_dir: pathlib.Path) -> None:
    """With several processes: a UserError on every process unless process 0's run directory is
    visible to all (a token file written by process 0, looked for by the others after a barrier).
    Checkpoints are written by every process into one directory: it must be on a shared filesystem."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int32(int.from_bytes(os.urandom(3), "little"))))
    path = run_dir / f".visible-{token}"
    if jax.process_index() == 0:
        path.write_text("written by process 0; every process must see it\n")
    multihost_utils.sync_global_devices("idiff run directory written")
    seen = multihost_utils.process_allgather(np.asarray(path.exists()))
    multihost_utils.sync_global_devices("idiff run directory read")
    if jax.process_index() == 0:
        path.unlink()
    missing = [i for i, ok in enumerate(np.ravel(seen)) if not ok]
    if missing:
        raise UserError(f"the run directory '{run_dir}' of process 0 is not visible to process(es) "
                        f"{', '.join(map(str, missing))}: put --out on a filesystem every host shares")
