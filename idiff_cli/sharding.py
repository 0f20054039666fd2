"""Meshes and placement for every command that shards: independent seeds or a batch split over the
devices, parameters replicated, one code path for one CPU, a GPU box and a multi-host TPU slice.

    mesh = batch_mesh()                                   # every device of every process, axis "batch"
    state = replicate(host_state, mesh)                   # the same values on every device
    batch = global_batch(local_batch, mesh)               # each process's rows -> one global array
    images = to_host(sharded_images)                      # numpy, the whole array, on every process

Also here: the host loop's bound on programs in flight (`keep_ahead`), the `--devices` count that
divides a batch (`device_count`), the shared-filesystem check of a multi-process run (`check_visible`),
joining a cluster from the environment and the on-disk compilation cache. The set-up that must run
before JAX starts is in devices.py.
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idiff_cli.devices import COMPILATION_CACHE_ENV, HEARTBEAT_ENV, JOIN_TIMEOUT_ENV, cluster_from_env, env_int
from idiff_cli.errors import UserError, first_line

AXIS = "batch"  # the mesh axis a batch is split along


# ---- meshes ----


def batch_mesh(axis: str = AXIS) -> Mesh:
    """A 1-D mesh over every device of every process (the global batch is split over it)."""
    return Mesh(np.array(jax.devices()), (axis,))


def seed_mesh(n: int, axis: str = "seeds") -> Mesh:
    """A 1-D mesh over the largest number of local devices that divides `n`."""
    devices = jax.local_devices()
    k = max(d for d in range(1, len(devices) + 1) if n % d == 0)
    return Mesh(np.array(devices[:k]), (axis,))


def mesh_of(n: int) -> Mesh:
    """The first `n` local devices of every process, as one 1-D mesh (process by process)."""
    devices = [d for p in range(jax.process_count()) for d in
               [d for d in jax.devices() if d.process_index == p][:n]]
    return Mesh(np.array(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole by every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


# ---- placement ----


def shard_leading(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` with its leading axis split over `mesh`'s single axis."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])))


def global_batch(local: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Assembles each process's slice of a batch (numpy, split along `batch_axis`) into global
    arrays sharded over `mesh` along that axis; single-process: a sharded `device_put`."""
    sharding = NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), mesh.axis_names[0]))

    def place(x):
        shape = list(x.shape)
        shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(place, local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (the same on every process) as arrays replicated over `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


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


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ---- the host loop ----

# Programs a host loop lets run ahead of the devices. XLA:CPU admits 32 programs in flight per
# device; with that many multi-device programs queued, host devices sharing the CPU's thread pool can
# stop for good inside a collective (jaxlib 0.10.2, 2 host devices on 2 cores: an all-reduce waits
# for a device that never arrives, and XLA aborts the process after 40 s; tests/test_parallel.py
# reproduces it). A few programs ahead keep the devices as busy as 32 do.
AHEAD = 8


def keep_ahead(dispatched: list, ahead: int = AHEAD) -> None:
    """Waits for the result `ahead` dispatches back, `dispatched[-1 - ahead]`, when there is one: a
    host loop that calls this after each dispatch has at most `ahead` + 1 programs queued."""
    if len(dispatched) > ahead:
        jax.block_until_ready(dispatched[-1 - ahead])


# ---- how many devices a batch is split over (--devices) ----


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
    """The local device counts d (1..`local`) with d · `processes` dividing `batch`, ascending."""
    return [d for d in range(1, local + 1) if batch % (d * processes) == 0]


# ---- several processes ----


def initialize_distributed_from_env() -> bool:
    """Joins the multi-process JAX cluster the environment describes (`devices.cluster_from_env`:
    explicit JAX_* variables, Open MPI, a Slurm step or a TPU slice of several processes), before any
    device is used, and prints one line naming it; returns whether it joined. CPU collectives go
    through gloo.

    Every process has $IDIFF_CLUSTER_TIMEOUT_S (300) to join; one that has not joined by then prints
    one line and exits with code 2. A thread keeps that deadline because JAX's own one ends the process
    with a fatal error of its C++ runtime, which Python cannot catch; JAX's is set a minute later. An
    error JAX raises while joining (a detector that finds nothing, an index out of range) is a UserError.
    """
    cluster = cluster_from_env()
    if cluster is None:
        return False
    where = f"the {cluster.name} as process {cluster.process} of {cluster.processes}"
    timeout = env_int(os.environ, JOIN_TIMEOUT_ENV, 300)

    def give_up():
        print(f"error: could not join {where} within {timeout} s ({JOIN_TIMEOUT_ENV}): every process must start "
              "and reach process 0's host and port", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = threading.Timer(timeout, give_up)
    deadline.daemon = True
    deadline.start()
    try:
        jax.distributed.initialize(**cluster.arguments, initialization_timeout=timeout + 60,
                                   heartbeat_timeout_seconds=env_int(os.environ, HEARTBEAT_ENV, 100))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"could not join {where}: {first_line(e) or type(e).__name__}") from None
    finally:
        deadline.cancel()
    print(f"joined {where}", file=sys.stderr, flush=True)
    return True


def check_visible(run_dir: pathlib.Path) -> None:
    """With several processes: a UserError on every process unless process 0's run directory is
    visible to all (a token file written by process 0, looked for by the others after a barrier).
    Checkpoints are written by every process into one directory: it must be on a shared filesystem."""
    if jax.process_count() == 1:
        return
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


# ---- compiled programs on disk ----


def use_compilation_cache() -> None:
    """Keeps every compiled program on disk ($IDIFF_JAX_CACHE, default ~/.cache/idiff/jax): a resumed
    run, `idiff sample` and a re-run with the same shapes read them back instead of compiling. All of
    them, not only the slow ones: a run compiles a hundred short programs besides its training step,
    and together they cost a re-run more than the slow ones (docs/results.md, "Compilation cache and
    the test suite"), for a few MB of disk per configuration."""
    path = os.environ.get(COMPILATION_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "idiff", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
