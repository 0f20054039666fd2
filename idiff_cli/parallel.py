"""Devices: use every CPU core, and shard independent seeds (or a batch) over the local devices.

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
