"""`idiff evaluate-fid RUN_DIR` on the session's tiny pretrained run: sampling, fid.json, and resuming
from the features kept on disk (an interrupted evaluation recomputes only the missing batches, with the
same samples, so the value is the same)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import IDIFF, error_line, invoke, rows
from suite_env import xla_flags


@pytest.fixture
def tiny_run(tiny_pretrain, tmp_path):
    """A copy of the session's pretrain run (evaluate-fid writes fid.json and features into it)."""
    return shutil.copytree(tiny_pretrain, tmp_path / "pretrain")


def test_pretrain_logs_the_periodic_fid(tiny_pretrain):
    """`--fid-every 2 --fid-n 6`: only the step-2 metrics row carries the FID of 6 EMA samples against
    the embedded digits; after two steps the samples are noise-like, far from digits (> 100;
    real-vs-real FID is ~3, real-vs-noise ~770)."""
    logged = rows(tiny_pretrain)
    assert [r["step"] for r in logged if "fid" in r] == [2]
    assert logged[-1]["fid_n"] == 6 and logged[-1]["fid"] > 100, logged[-1]


@pytest.mark.slow  # three evaluate-fid runs
def test_fid_of_a_run_is_written_and_resumes_from_kept_features(tiny_run):
    args = ["evaluate-fid", tiny_run, "--n", "6", "--batch", "4", "--sample-steps", "2"]
    invoke(*args, check=True)
    fid = json.loads((tiny_run / "fid.json").read_text())
    assert fid["metric"] == "FID (MNIST classifier features)" and fid["n"] == 6 and fid["checkpoint"] == 2
    assert fid["sampler"] == "euler-maruyama" and fid["sample_steps"] == 2 and np.isfinite(fid["value"])
    store = tiny_run / "fid" / "mnist-classifier-ckpt2-euler-maruyama-2steps-b4-seed0"
    assert sorted(p.name for p in store.iterdir()) == ["batch-00000.npy", "batch-00001.npy"]
    kept, lost = np.load(store / "batch-00000.npy"), np.load(store / "batch-00001.npy")
    (store / "batch-00001.npy").unlink()
    (store / "batch-00000.npy").write_bytes((store / "batch-00000.npy").read_bytes())  # same bytes, new mtime
    mtime = (store / "batch-00000.npy").stat().st_mtime_ns
    invoke(*args, check=True)
    assert (store / "batch-00000.npy").stat().st_mtime_ns == mtime  # reused, not recomputed
    np.testing.assert_array_equal(np.load(store / "batch-00001.npy"), lost)  # same samples again
    assert json.loads((tiny_run / "fid.json").read_text())["value"] == fid["value"]
    invoke(*args[:2], "--n", "10", *args[4:], check=True)  # a larger --n adds one batch
    assert len(list(store.iterdir())) == 3
    np.testing.assert_array_equal(np.load(store / "batch-00000.npy"), kept)


@pytest.mark.slow  # two evaluate-fid runs in child processes
def test_features_and_fid_do_not_depend_on_the_device_count(tiny_pretrain, tmp_path):
    """Batch 0 evaluated on 1 device (a fresh process), then the evaluation resumed to 2 batches on 2
    devices (this process), gives the features and FID of an evaluation done on 2 devices throughout:
    each batch's images come from its one key, whatever the split (rtol 1e-5: the two programs may
    round the network's sums differently)."""
    whole, resumed = (shutil.copytree(tiny_pretrain, tmp_path / name) for name in ("whole", "resumed"))
    args = ["--n", "8", "--batch", "4", "--sample-steps", "2"]
    invoke("evaluate-fid", whole, *args, check=True)
    one = subprocess.run([sys.executable, *IDIFF, "evaluate-fid", str(resumed), "--n", "4", *args[2:]],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": xla_flags(1)})
    assert one.returncode == 0, one.stderr
    invoke("evaluate-fid", resumed, *args, check=True)
    tag = "fid/mnist-classifier-ckpt2-euler-maruyama-2steps-b4-seed0"
    for batch in ("batch-00000.npy", "batch-00001.npy"):
        np.testing.assert_allclose(np.load(resumed / tag / batch), np.load(whole / tag / batch), rtol=1e-5,
                                   atol=1e-6, err_msg=batch)
    fids = [json.loads((run / "fid.json").read_text())["value"] for run in (resumed, whole)]
    np.testing.assert_allclose(fids[0], fids[1], rtol=1e-4)


def test_a_directory_without_a_trained_model_is_a_one_line_error(tmp_path):
    assert "holds no trained model" in error_line(invoke("evaluate-fid", tmp_path))


@pytest.mark.slow
def test_a_signal_stops_the_evaluation_after_a_batch_and_keeps_its_features(tiny_run):
    """SIGTERM while sampling: exit 143 after the current batch, the finished batches' features kept;
    the same command again computes only the rest. The signal is sent once batch 1's file exists: the
    handlers are armed when the first batch's step returns (a signal before that, i.e. while batch 0
    compiles and is written, ends the process by its default action, as documented in signals.py)."""
    args = ["evaluate-fid", str(tiny_run), "--n", "40", "--batch", "4", "--sample-steps", "2"]
    proc = subprocess.Popen([sys.executable, *IDIFF, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    store = tiny_run / "fid" / "mnist-classifier-ckpt2-euler-maruyama-2steps-b4-seed0"
    deadline = time.time() + 300
    while not (store / "batch-00001.npy").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    kept = sorted(p.name for p in store.glob("batch-*.npy"))
    assert 2 <= len(kept) < 10 and f"the features of {len(kept)} batches are kept" in " ".join(err.split()), err
    invoke(*args, check=True)
    assert len(list(store.glob("batch-*.npy"))) == 10
