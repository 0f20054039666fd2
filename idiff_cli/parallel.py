"""Devices: use every CPU core, shard independent seeds (or a batch) over the local devices, join
a multi-process cluster, and keep compiled programs on disk.

One XLA CPU device runs a small `lax.scan` on one thread; exposing each core as a host device and
sharding the seed axis over them runs the seeds in parallel (1.7-2x on the 2-core CPU, see
benchmarks/langevin.py). On GPU/TPU the flag is ignored and the real devices are used.
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count"


def use_host_cores(count: int | None = None) -> None:
    """Exposes `count` (default: all) CPU cores as XLA host devices. Must run before JAX starts;
    a no-op if JAX is already imported or the user set the flag."""
    if "jax" in sys.modules or _FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    count = count or min(os.cpu_count() or 1, 8)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}={count}").strip()


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
        import jax

        jax.block_until_ready(dispatched[-1 - ahead])


def seed_mesh(n: int, axis: str = "seeds"):
    """A 1-D mesh over the largest number of local devices that divides `n`."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.local_devices()
    k = max(d for d in range(1, len(devices) + 1) if n % d == 0)
    return Mesh(np.array(devices[:k]), (axis,))


def shard_leading(tree, mesh):
    """Places every array of `tree` with its leading axis split over `mesh`'s single axis."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return jax.device_put(tree, sharding)


# ---- data parallelism over every device of every process (pretraining) ----

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
# Seconds without a heartbeat after which the cluster declares a process dead and the others end
# (jax.distributed's default: 100).
HEARTBEAT_ENV = "IDIFF_HEARTBEAT_TIMEOUT_S"


def initialize_distributed_from_env() -> bool:
    """Joins a multi-process JAX cluster when the environment says so, before any device is used:

    * `JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`: explicit (any platform;
      on CPU the collectives go through gloo);
    * a multi-host TPU VM slice (`TPU_WORKER_HOSTNAMES` lists several hosts): `jax.distributed.initialize()`
      finds everything itself.

    Returns whether the process joined a cluster. Launch line on a TPU VM pod slice:
    `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="idiff pretrain cifar10 --preset paper ..."`.
    """
    import jax

    if os.environ.get(COORDINATOR_ENV):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR_ENV],
                                   num_processes=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                                   process_id=int(os.environ.get("JAX_PROCESS_ID", "0")),
                                   heartbeat_timeout_seconds=int(os.environ.get(HEARTBEAT_ENV, "100")))
        return True
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False


def lost_peer(error: BaseException) -> str | None:
    """One line for a JAX runtime error in a multi-process run, where it means a collective failed,
    most often because another process of the cluster ended (gloo: "Connection reset by peer"); None
    for any other error, or before JAX started."""
    jax = sys.modules.get("jax")
    if jax is None or type(error).__name__ != "JaxRuntimeError" or jax.process_count() == 1:
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"process {jax.process_index()} of {jax.process_count()} stopped: {first} -- if another process "
            "of the run ended, re-run the same command on every process: it resumes from the last checkpoint")


def batch_mesh(axis: str = "batch"):
    """A 1-D mesh over every device of every process (the global batch is split over it)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()), (axis,))


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def global_batch(local, mesh, batch_axis: int = 0):
    """Assembles each process's slice of a batch (numpy, split along `batch_axis`) into global
    arrays sharded over `mesh` along that axis; single-process: a sharded `device_put`."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    spec = PartitionSpec(*([None] * batch_axis), mesh.axis_names[0])
    sharding = NamedSharding(mesh, spec)

    def put(x):
        shape = list(x.shape)
        shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(put, local)


def replicate(tree, mesh):
    """Host values (the same on every process) as arrays replicated over `mesh`."""
    import jax
    import numpy as np

    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(x):
    """A (possibly sharded, possibly multi-process) array as one numpy array on every process."""
    import jax
    import numpy as np

    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def use_compilation_cache() -> None:
    """Keeps compiled programs on disk ($IDIFF_JAX_CACHE, default ~/.cache/idiff/jax): compiling the
    U-Net's training step takes about a minute on two CPU cores, and a resumed run, `idiff sample`
    and a re-run with the same shapes read it back instead."""
    import jax

    path = os.environ.get("IDIFF_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "idiff", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
