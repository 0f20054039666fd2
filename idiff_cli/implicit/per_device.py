"""The finetune's batch split over the devices of every process (paper §3.3, Fig. 3: one step of the
sampler is applied in parallel to all distributions of the queue): the parts of an outer step that run
on each device's own rows.

A 1-D mesh (`sharding.mesh_of`) holds the first n local devices of each process. θ, θ0 and the
optimiser state are replicated; the carried paths (a carry leaf ending in [B, H, W, C]) stay split
along B between outer steps (`state_shardings`). The two loops of an outer step run on each device's
own rows under `shard_map`: the queue's advance (`advance_per_device`) and the adjoint's walk back
(`walk_per_device`, which sums the weight gradient over the devices once, at its end). Left to XLA's
partitioner, both lose most of the split: the queue's vmapped slots merge into the network's batch
with the split axis minor, so every convolution all-gathers its input, and the walk sums the weight
gradient in every step, so every step waits for the slower device. Every other image batch the
network sees (the terminal gradient, the Girsanov KL's fresh paths, the grids) is constrained to be
split along B (`BatchSharded.score`) and partitioned by XLA. The random draws do not depend on the
split: a Gaussian step draws a device's rows of the whole batch's noise
(`samplers.GaussianStep.split_axis`), and under jit JAX's partitionable threefry
(`jax_threefry_partitionable`, on by default) draws each element from its index alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idiff_cli.diffusion.samplers import Sampler
from idiff_cli.implicit import adjoint
from idiff_cli.implicit import queue as queue_lib
from idiff_cli.sharding import AXIS, replicated


class BatchSharded:
    """`model` (a diffusion.model.Model) whose score splits its input batch x [B, ...] over `mesh`
    and whose sampler draws split-invariant noise; every other attribute is the model's. The
    constraint sits where the work is, the network's input, so each program XLA partitions (the
    terminal gradient, fresh paths, grids) is split along the batch however it builds its batches.
    Under `shard_map` with the batch axis manual (`advance_per_device`, `walk_per_device`) x is one
    device's rows already: no constraint, and the whole batch's labels are cut to its rows."""

    def __init__(self, model: Any, mesh: Mesh):
        self._model = model
        self.mesh = mesh

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def score(self, params, x, t, labels=None):
        return split_rows(self._model.score, self.mesh)(params, x, t, labels)

    def sampler(self, n_steps: int | None = None, name: str | None = None, eta: float = 0.0) -> Sampler:
        """The model's sampler, a Gaussian step drawing each device's rows of the whole batch's noise
        (the finetune's other samplers, probability-flow and ddim with η = 0, draw none)."""
        sampler = self._model.sampler(n_steps, name, eta)
        if sampler.stochastic:
            return dataclasses.replace(sampler, step_fn=dataclasses.replace(sampler.step_fn, split_axis=AXIS))
        return sampler


def split_rows(score: Callable, mesh: Mesh) -> Callable:
    """score(params, x, t, labels) with its input batch x [B, ...] constrained to be split over `mesh`;
    under `shard_map` with the batch axis manual, x is one device's rows already and the whole batch's
    labels [B] are cut to its rows."""
    split = NamedSharding(mesh, PartitionSpec(AXIS))

    def rows(params, x, t, labels=None):
        if AXIS in jax.sharding.get_abstract_mesh().manual_axes:
            if labels is not None and labels.shape[0] != x.shape[0]:
                labels = jax.lax.dynamic_slice_in_dim(labels, jax.lax.axis_index(AXIS) * x.shape[0], x.shape[0])
            return score(params, x, t, labels)
        return score(params, jax.lax.with_sharding_constraint(x, split), t, labels)

    return rows


_WHOLE = PartitionSpec()


def walk_per_device(mesh: Mesh) -> Callable:
    """`adjoint.walk_paths` with each device walking its own rows of every path and the weight
    gradients summed over the devices once, after the walks (XLA's partitioner sums them in every
    step; docs/results.md compares the two). The transition regenerates its steps' noise for the
    device's rows (a BatchSharded model's sampler)."""
    paths_spec = PartitionSpec(None, None, AXIS)  # states [S, n + 1, B, ...]
    rows_spec = PartitionSpec(None, AXIS)  # adjoints [S, B, ...]

    def walk(transition, params, states, keys, adj, first, batched=False):
        batch = states.shape[2]

        def rows(params, states, keys, a, first):
            zeros = lambda x: jnp.zeros(a.shape[:1] + x.shape, x.dtype)  # noqa: E731
            start = adjoint.AdjointState(a, jax.tree.map(zeros, params), jnp.zeros(a.shape[:1], a.dtype))
            out = adjoint.walk_paths(transition, params, states, keys, start, first, batched, batch)
            return jax.lax.psum((out.g, out.running), AXIS), out.a

        (g, running), a = jax.shard_map(rows, mesh=mesh, in_specs=(_WHOLE, paths_spec, _WHOLE, rows_spec, _WHOLE),
                                        out_specs=((_WHOLE, _WHOLE), rows_spec), check_vma=False)(
            params, states, keys, adj.a, first)
        return adjoint.AdjointState(a, jax.tree.map(jnp.add, adj.g, g), adj.running + running)

    return walk


def advance_per_device(mesh: Mesh) -> Callable:
    """`queue.queue_advance` with each device advancing its own rows of every slot: no communication
    (XLA's partitioner all-gathers the input of every convolution of the vmapped slots; docs/results.md
    compares the two). The step draws its noise by rows (a BatchSharded model's sampler), so the paths
    are those of one program on one device."""
    slots_spec = PartitionSpec(None, None, AXIS)  # [M, T + 1, B, ...]

    def advance(step, params, queue, M, T):
        def rows(params, states, keys):
            return queue_lib.queue_advance(step, params, queue._replace(states=states, keys=keys), M, T)[0].states

        states = jax.shard_map(rows, mesh=mesh, in_specs=(_WHOLE, slots_spec, _WHOLE), out_specs=slots_spec,
                               check_vma=False)(params, queue.states, queue.keys)
        return queue._replace(states=states), queue_lib.Completed(states[-1], queue.keys[-1])

    return advance


def state_shardings(shapes: Any, mesh: Mesh, images: tuple[int, ...]) -> Any:
    """Shardings of a state (its `jax.eval_shape`): a leaf ending in the image batch `images`
    ([B, H, W, C]) split along B, every other leaf replicated."""
    k = len(images)

    def leaf(spec):
        if tuple(spec.shape[-k:]) == tuple(images) and len(spec.shape) >= k:
            return NamedSharding(mesh, PartitionSpec(*([None] * (len(spec.shape) - k)), AXIS))
        return replicated(mesh)

    return jax.tree.map(leaf, shapes)
