"""The devices as the command line sets them up before JAX starts: every CPU core as an XLA host
device, the environment variables that configure devices and clusters, the cluster a process belongs
to (`cluster_from_env`), and the one-line message for a multi-process run whose peer ended. Nothing
here imports JAX (cli.py imports this module first).

One XLA CPU device runs a small `lax.scan` on one thread; exposing each core as a host device lets a
sharded seed or batch axis run on all cores (measured ratios: docs/results.md). On GPU/TPU the flag is
ignored and the real devices are used.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import urllib.request
from typing import Any, Mapping

from idiff_cli.errors import UserError, first_line

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# An explicit multi-process cluster: JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i.
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Seconds without a heartbeat after which the cluster declares a process dead and the others end
# (jax.distributed's default: 100).
HEARTBEAT_ENV = "IDIFF_HEARTBEAT_TIMEOUT_S"
# Seconds every process of a cluster has to join it (jax.distributed's default: 300).
JOIN_TIMEOUT_ENV = "IDIFF_CLUSTER_TIMEOUT_S"
# Hosts of a TPU slice on GKE, comma-separated (JAX reads TPU_PROCESS_ADDRESSES first); several mean
# a multi-host slice. A Cloud TPU VM lists them in its metadata instead.
TPU_HOSTS_ENV = "TPU_WORKER_HOSTNAMES"
# The machine's product name: "Google Compute Engine" on a GCE or Cloud TPU VM.
GCE_PRODUCT_FILE = pathlib.Path("/sys/class/dmi/id/product_name")
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
    first = first_line(error) or type(error).__name__
    return (f"process {jax.process_index()} of {jax.process_count()} stopped: {first} -- if another process "
            "of the run ended, re-run the same command on every process: it resumes from the last checkpoint")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A cluster of several processes that the environment describes: `name` as printed, this
    process's index of `processes`, and the arguments of `jax.distributed.initialize` that join it."""

    name: str
    process: int
    processes: int
    arguments: dict[str, Any]


def cluster_from_env(env: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster this process is one of, or None for a single process. The first that applies:

    * `JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i` (a UserError if N or i
      is missing), joined with these values alone;
    * Open MPI's `mpirun` (`OMPI_MCA_orte_hnp_uri`, set by Open MPI 4 and older) of several ranks;
    * a Slurm step (`srun`: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
      SLURM_LOCALID all set) of several tasks: a batch script itself, or a step of one task, does not join;
    * a TPU slice of several hosts: on GKE, TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES (with
      TPU_WORKER_ID); on a Cloud TPU VM, the metadata server's `worker-network-endpoints`.

    Open MPI and Slurm come in JAX's order, and each is joined by JAX's own detector for it
    (`cluster_detection_method`), which reads the variables named here."""
    if env.get(COORDINATOR_ENV):
        missing = [name for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if not env.get(name)]
        if missing:
            raise UserError(f"{COORDINATOR_ENV} is set without {' and '.join(missing)}: set all three on every process")
        processes, process = env_int(env, NUM_PROCESSES_ENV), env_int(env, PROCESS_ID_ENV)
        return Cluster(f"cluster of {COORDINATOR_ENV}={env[COORDINATOR_ENV]}", process, processes,
                       {"coordinator_address": env[COORDINATOR_ENV], "num_processes": processes,
                        "process_id": process, "cluster_detection_method": "deactivate"})
    if "OMPI_MCA_orte_hnp_uri" in env and env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return Cluster("Open MPI job", env_int(env, "OMPI_COMM_WORLD_RANK"), env_int(env, "OMPI_COMM_WORLD_SIZE"),
                       {"cluster_detection_method": "ompi"})
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in env for name in slurm) and env_int(env, "SLURM_NTASKS") > 1:
        return Cluster("Slurm step", env_int(env, "SLURM_PROCID"), env_int(env, "SLURM_NTASKS"),
                       {"cluster_detection_method": "slurm"})
    gke_hosts = env.get("TPU_PROCESS_ADDRESSES", env.get(TPU_HOSTS_ENV))
    if gke_hosts is not None:
        hosts = [h for h in gke_hosts.split(",") if h]
        if len(hosts) > 1:
            return Cluster("GKE TPU slice", env_int(env, "TPU_WORKER_ID"), len(hosts),
                           {"cluster_detection_method": "gketpu"})
        return None
    workers = tpu_vm_metadata("worker-network-endpoints", env)
    if workers and len(workers.split(",")) > 1:
        return Cluster("TPU VM slice", int(tpu_vm_metadata("agent-worker-number", env) or 0), len(workers.split(",")),
                       {"cluster_detection_method": "gcetpu"})
    return None


def tpu_vm_metadata(key: str, env: Mapping[str, str] = os.environ) -> str | None:
    """An attribute of this Cloud TPU VM from the metadata server (at $GCE_METADATA_IP, as JAX reads it);
    None off Google Compute Engine, where nothing is asked, or where the VM has no such attribute."""
    try:
        if "Google" not in GCE_PRODUCT_FILE.read_text():
            return None
        host = env.get("GCE_METADATA_IP", "metadata.google.internal")
        request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                         headers={"Metadata-Flavor": "Google"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as answer:
            return answer.read().decode().strip()
    except OSError:  # no such file, an HTTP error (404: not a TPU VM), no answer
        return None


def env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    """The integer in env[name] (`default` when unset); a UserError naming the variable otherwise."""
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer, got {'nothing' if value is None else repr(value)}") from None
