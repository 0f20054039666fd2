"""Joining a cluster by itself (docs/cluster.md): which environment is a cluster of several processes
(`devices.cluster_from_env`, JAX's detection order), two local processes given Slurm's variables join
through JAX's Slurm detector (a pretraining run of two Slurm tasks: test_pretrain_cli.py), a process
that cannot join ends in one line within the timeout, and the TPU VM scripts print their exact
`gcloud` commands under DRY_RUN=1."""

import http.server
import json
import os
import pathlib
import shlex
import subprocess
import textwrap
import threading

import pytest
from helpers import IDIFF, slurm_port, slurm_task

from idiff_cli import devices
from idiff_cli.devices import Cluster, cluster_from_env
from idiff_cli.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "experiments" / "tpu"

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
EXPLICIT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


@pytest.fixture
def off_gce(monkeypatch, tmp_path):
    """This machine as a non-GCE one, whatever it is: the metadata server is never asked."""
    monkeypatch.setattr(devices, "GCE_PRODUCT_FILE", tmp_path / "no-product-name")


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # a step of one task
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # the batch script, outside srun
    (SLURM, Cluster("Slurm step", 1, 2, {"cluster_detection_method": "slurm"})),
    ({**OMPI, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, None),
    ({**SLURM, **OMPI}, Cluster("Open MPI job", 3, 4, {"cluster_detection_method": "ompi"})),  # mpirun in an allocation
    ({**SLURM, **EXPLICIT}, Cluster("cluster of JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", 1, 2, {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
        "cluster_detection_method": "deactivate"})),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"},
     Cluster("GKE TPU slice", 2, 4, {"cluster_detection_method": "gketpu"})),
    ({"TPU_WORKER_HOSTNAMES": "t-0", "TPU_WORKER_ID": "0"}, None),
], ids=["none", "slurm-one-task", "slurm-batch-script", "slurm", "ompi-one-rank", "ompi-before-slurm",
        "explicit-first", "gke-tpu", "gke-one-host"])
def test_which_environment_is_a_cluster(off_gce, env, expected):
    assert cluster_from_env(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "set without JAX_NUM_PROCESSES: set all three"),
    ({**EXPLICIT, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, "TPU_WORKER_ID must be an integer, got nothing"),
])
def test_an_incomplete_cluster_environment_is_one_line(off_gce, env, message):
    with pytest.raises(UserError, match=message):
        cluster_from_env(env)


def test_a_cloud_tpu_vm_slice_is_read_from_the_metadata_server(monkeypatch, tmp_path):
    """On GCE the metadata server lists the slice's workers: several join (process index: the VM's
    agent-worker-number); a VM that lists one worker, or none (a GCE VM without TPU answers 404), does not."""
    answers = {}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.rsplit("/", 1)[-1]
            ok = self.headers.get("Metadata-Flavor") == "Google" and key in answers
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(answers[key].encode() if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    product = tmp_path / "product_name"
    product.write_text("Google Compute Engine\n")
    monkeypatch.setattr(devices, "GCE_PRODUCT_FILE", product)
    env = {"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"}
    try:
        assert cluster_from_env(env) is None
        answers.update({"worker-network-endpoints": "w-0:0:10.0.0.2,w-1:1:10.0.0.3", "agent-worker-number": "1"})
        assert cluster_from_env(env) == Cluster("TPU VM slice", 1, 2, {"cluster_detection_method": "gcetpu"})
        answers["worker-network-endpoints"] = "w-0:0:10.0.0.2"
        assert cluster_from_env(env) is None
    finally:
        server.shutdown()


# ---- two processes under Slurm's variables ----


# What a command does before its work: join, then the shared-directory check's collectives (gloo).
JOIN = textwrap.dedent("""
    import pathlib, sys, jax
    from idiff_cli.sharding import check_visible, initialize_distributed_from_env
    assert initialize_distributed_from_env()
    check_visible(pathlib.Path(sys.argv[1]))
    print("processes", jax.process_count(), "devices", len(jax.devices()))
""")


def test_two_slurm_tasks_join_through_jax_s_slurm_detector(tmp_path):
    """JAX's detector finds process 0 at the first host of SLURM_STEP_NODELIST, on the port it derives
    from SLURM_JOB_ID; the joined processes see both devices and run collectives."""
    port = slurm_port()
    tasks = [slurm_task(["-c", JOIN, tmp_path], task, port) for task in (0, 1)]
    outputs = [t.communicate(timeout=120)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs
    for task, output in enumerate(outputs):
        lines = output.splitlines()
        assert f"joined the Slurm step as process {task} of 2" in lines and lines[-1] == "processes 2 devices 2", output


def test_a_task_that_cannot_join_ends_in_one_line_within_the_timeout(tmp_path):
    """Task 1 of 2 alone: process 0's coordinator never answers. JAX's own deadline would abort the
    process with a C++ fatal error; idiff's, 1 s here, ends it first with one line and exit code 2."""
    task = slurm_task([*IDIFF, "pretrain", "mnist", "--steps", 1, "--out", tmp_path / "run"], 1, slurm_port(),
                      IDIFF_CLUSTER_TIMEOUT_S="1")
    output = task.communicate(timeout=120)[0]
    assert task.returncode == 2, output
    assert output.strip().splitlines() == [
        "error: could not join the Slurm step as process 1 of 2 within 1 s (IDIFF_CLUSTER_TIMEOUT_S): every process "
        "must start and reach process 0's host and port"], output
    assert not (tmp_path / "run").exists()


# ---- experiments/tpu/ ----

TPU_VARIABLES = ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "BUCKET", "PROJECT", "RUN_NAME", "WORKERS",
                 "SCRIPT_ENV", "DRY_RUN")
# Stand-ins for gcloud and git: each logs its arguments as one JSON list.
FAKE = """#!/usr/bin/env bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$(basename "$0")" "$@" >> "$FAKE_LOG"
"""


def tpu_script(name: str, tmp_path: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """experiments/tpu/NAME ARGS in tmp_path/work, with gcloud and git stand-ins first on PATH."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    for d in (bin_dir, work):
        d.mkdir(exist_ok=True)
    for tool in ("gcloud", "git"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in TPU_VARIABLES}
    return subprocess.run(["bash", str(TPU / name), *args], cwd=work, capture_output=True, text=True, timeout=60,
                          env={**base, "PATH": f"{bin_dir}:{base['PATH']}", "TMPDIR": str(tmp_path),
                               "FAKE_LOG": str(tmp_path / "calls.jsonl"), **env})


def expected_commands(tmp_path) -> dict[str, list[str]]:
    where = "--zone=us-central2-b"
    ssh = f"gcloud compute tpus tpu-vm ssh idiff {where}"
    return {
        "create.sh": [f"gcloud compute tpus tpu-vm create idiff {where} --accelerator-type=v4-16 "
                      "--version=tpu-ubuntu2204-base"],
        "install.sh": [
            f"git -C {ROOT} archive --format=tar.gz --output={tmp_path}/idiff-idiff.tar.gz HEAD",
            f"gcloud compute tpus tpu-vm scp {tmp_path}/idiff-idiff.tar.gz idiff:idiff.tar.gz {where} --worker=all",
            f"{ssh} --worker=all --command='rm -rf idiff && mkdir idiff && tar -xzf idiff.tar.gz -C idiff && "
            "python3 -m pip install --user --upgrade uv && python3 -m uv venv --python 3.12 venv && "
            "python3 -m uv pip install --python venv/bin/python \"jax[tpu]\" -e ./idiff'"],
        "run.sh": [f"{ssh} --worker=all --command='. venv/bin/activate && cd idiff && "
                   "OUT=gs://idiff-runs/runs/pretrain_mnist experiments/pretrain_mnist.sh'"],
        "fetch.sh": ["mkdir -p runs/pretrain_mnist",
                     "gcloud storage rsync --recursive gs://idiff-runs/runs/pretrain_mnist runs/pretrain_mnist"],
        "delete.sh": [f"gcloud compute tpus tpu-vm delete idiff {where} --quiet"],
    }


def test_tpu_scripts_print_their_exact_commands_and_run_nothing_under_dry_run(tmp_path):
    expected = expected_commands(tmp_path)
    assert sorted(expected) == sorted(p.name for p in TPU.glob("*.sh") if p.name != "lib.sh")
    for name, lines in expected.items():
        result = tpu_script(name, tmp_path, DRY_RUN="1")
        assert result.returncode == 0 and result.stdout.splitlines() == lines, (name, result.stdout, result.stderr)
    assert not (tmp_path / "calls.jsonl").exists() and not any((tmp_path / "work").iterdir())


def test_tpu_run_prints_what_it_runs_with_the_settings_given(tmp_path):
    """Without DRY_RUN gcloud receives the arguments of the line printed (read back by a shell); the
    variables set reach the command, the script's arguments reach the remote command intact."""
    result = tpu_script("run.sh", tmp_path, "langevin_reward.sh", "--seed", "it's 7", TPU_NAME="t", ZONE="z",
                        PROJECT="p", BUCKET="b", WORKERS="0", SCRIPT_ENV="SMOKE=1")
    assert result.returncode == 0, result.stderr
    printed = shlex.split(result.stdout.strip())
    assert [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()] == [printed]
    assert printed[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--project=p", "--worker=0"]
    remote = printed[9].removeprefix("--command=")
    assert shlex.split(remote) == [".", "venv/bin/activate", "&&", "cd", "idiff", "&&",
                                   "OUT=gs://b/runs/langevin_reward", "SMOKE=1", "experiments/langevin_reward.sh",
                                   "--seed", "it's 7"]

    missing = tpu_script("run.sh", tmp_path, "nope.sh", DRY_RUN="1")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == f"error: no experiments/nope.sh in {ROOT}\n"
