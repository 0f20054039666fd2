"""What the command-line tests share: `idiff` called in this process or in child processes (one, or
two joined as a cluster), a run directory's metrics rows and saved arrays, and the one-line error of
refused input."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from idiff_cli.cli import app
from suite_env import xla_flags

CLOCK = ("wall_s", "images_per_s")  # wall-clock fields: the only ones in which equal runs differ


def invoke(*args, check: bool = False):
    """`idiff ARGS` in this process (each argument str()-ed); returns the click result. With `check`,
    the command must exit 0 (the assertion shows its output)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert not check or result.exit_code == 0, result.output
    return result


def rows(run_dir, method: str | None = None, drop=(), sort: bool = False) -> list[dict]:
    """The rows of run_dir/metrics.jsonl (those of `method`), without the fields in `drop`; with `sort`,
    by (method, step): a resumed run appends its unit's rows after those of the units done before."""
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    out = [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]
    out = [r for r in out if method is None or r.get("method") == method]
    return sorted(out, key=lambda r: (r["method"], r["step"])) if sort else out


def arrays(run_dir) -> dict[str, np.ndarray]:
    """Every saved array of a run (*.npz, methods/*.npz), keyed `file:array`."""
    run_dir = pathlib.Path(run_dir)
    out = {}
    for path in sorted(run_dir.glob("*.npz")) + sorted(run_dir.glob("methods/*.npz")):
        with np.load(path) as npz:
            out.update({f"{path.relative_to(run_dir)}:{k}": npz[k] for k in npz.files})
    return out


def assert_same_arrays(a, b) -> None:
    """Run directories a and b saved the same arrays, bit for bit."""
    a, b = arrays(a), arrays(b)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for key, value in a.items():
        np.testing.assert_array_equal(b[key], value, err_msg=key)


def error_line(result) -> str:
    """The one line of a refused command (exit code 2, `error: ...`), checked."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IDIFF = ["-c", "from idiff_cli.cli import main; main()"]  # `python IDIFF ARGS` runs `idiff ARGS`


def cli(*args, env=None) -> subprocess.Popen:
    """`idiff ARGS` in a child process (stdout and stderr together, text)."""
    return subprocess.Popen([sys.executable, *IDIFF, *map(str, args)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def slurm_port() -> int:
    """The first free port of the range JAX's Slurm detector derives the coordinator's port from
    (61440 + SLURM_JOB_ID mod 4096, above Linux's ephemeral ports): the tests set SLURM_JOB_ID to reach it."""
    for port in range(61440, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 61440-65535")


def slurm_task(args, task: int, port: int, **env) -> subprocess.Popen:
    """`python ARGS` as task `task` of a 2-task Slurm step on this machine (one host device), in an
    environment without any other cluster's variables."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR", "JAX_NUM_", "JAX_PROCESS_"))}
    slurm = {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
             "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_NODEID": "0"}
    return subprocess.Popen([sys.executable, *map(str, args)], env={**base, "XLA_FLAGS": xla_flags(1), **slurm, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cluster(args, out, per_process=({}, {}), **env) -> list[subprocess.Popen]:
    """`idiff ARGS --out OUT` as two processes of one device each, joined by jax.distributed on
    127.0.0.1 (gloo); `env` goes to both, `per_process[i]` to process i alone."""
    port = free_port()
    return [cli(*args, "--out", out, env={"XLA_FLAGS": xla_flags(1), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                          "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), **env, **per_process[i]})
            for i in range(2)]
