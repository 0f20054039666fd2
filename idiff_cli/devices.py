"""The devices as the command line sets them up before JAX starts: every CPU core as an XLA host
device, the environment variables that configure devices and clusters, and the one-line message for
a multi-process run whose peer ended. Nothing here imports JAX (cli.py imports this module first).

One XLA CPU device runs a small `lax.scan` on one thread; exposing each core as a host device lets a
sharded seed or batch axis run on all cores (measured ratios: docs/results.md). On GPU/TPU the flag is
ignored and the real devices are used.
"""

from __future__ import annotations

import os
import sys

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# An explicit multi-process cluster: JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i.
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Seconds without a heartbeat after which the cluster declares a process dead and the others end
# (jax.distributed's default: 100).
HEARTBEAT_ENV = "IDIFF_HEARTBEAT_TIMEOUT_S"
# Hosts of a TPU VM slice, comma-separated; several mean a multi-host slice.
TPU_HOSTS_ENV = "TPU_WORKER_HOSTNAMES"
# The directory of compiled programs kept on disk (default ~/.cache/idiff/jax).
COMPILATION_CACHE_ENV = "IDIFF_JAX_CACHE"


def use_host_cores(count: int | None = None) -> None:
    """Exposes `count` (default: all, at most 8) CPU cores as XLA host devices. Must run before JAX
    starts; a no-op if JAX is already imported or the user set the flag."""
    if "jax" in sys.modules or HOST_DEVICES_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    count = count or min(os.cpu_count() or 1, 8)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {HOST_DEVICES_FLAG}={count}").strip()


def lost_peer(error: BaseException) -> str | None:
    """One line for a JAX runtime error in a multi-process run, where it means a collective failed,
    most often because another process of the cluster ended (gloo: "Connection reset by peer"); None
    for any other error, or before JAX started (JAX is read from sys.modules, never imported)."""
    jax = sys.modules.get("jax")
    if jax is None or type(error).__name__ != "JaxRuntimeError" or jax.process_count() == 1:
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"process {jax.process_index()} of {jax.process_count()} stopped: {first} -- if another process "
            "of the run ended, re-run the same command on every process: it resumes from the last checkpoint")
