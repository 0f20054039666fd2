"""`idiff finetune` with its image batches split over devices and processes (implicit/per_device.py).

Splitting the batch changes only the order in which the batch's contributions are summed (the reward
and KL means, the weight gradients): the random draws do not depend on the split (the partitionable
threefry's, element by element; a device's rows of the whole batch's draw inside `shard_map`). So 2
host devices must give the trajectory of 1 device to rounding. The float64 oracle of the per-device
parts (1e-10 relative; the queue's advance, the adjoint walks, implicit's Γ over 2M + 2 outer steps) is
tests/test_sharded_parts.py, on the 1-D Gaussian problem; here the whole command, in float32: the
logged metrics agree to 1e-5, θ to 1e-3 of its scale (observed over 5 steps: 2.3e-7, 3.2e-4): Adam divides
each gradient coordinate by its own RMS, so a rounding difference in a coordinate whose gradient is
itself at rounding size moves θ by up to lr per step.
"""

from __future__ import annotations

import signal
import time

import jax
import numpy as np
import pytest
from conftest import SPLIT_FINETUNE
from helpers import CLOCK, cluster, invoke, rows

from idiff_cli import sharding
from idiff_cli.diffusion import model
from idiff_cli.errors import UserError


def test_device_count_divides_the_batch_or_says_why():
    assert sharding.device_count(8, None, 2) == (2, "")
    n, note = sharding.device_count(6, None, 4)
    assert n == 3 and "split over 3 of the 4 local devices" in note
    assert sharding.device_count(8, 1, 2) == (1, "")
    with pytest.raises(UserError, match="--devices 3 on 1 process"):
        sharding.device_count(8, 3, 4)
    with pytest.raises(UserError, match="has 2 local device"):
        sharding.device_count(8, 4, 2)
    assert sharding.device_count(8, None, 4, processes=2) == (4, "")
    with pytest.raises(UserError, match="not divisible by the 2 processes"):
        sharding.device_count(3, None, 2, processes=2)


def test_an_explicit_device_count_that_cannot_divide_the_batch_is_one_line(tiny_pretrain, tmp_path):
    result = invoke("finetune", "--from", tiny_pretrain, *SPLIT_FINETUNE, "--batch", "3", "--kl-n", "3", "--devices", "2",
                    "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --devices 2 on 1 process(es) does not divide")
    assert not (tmp_path / "run").exists()


def max_relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def flat_theta(run) -> np.ndarray:
    """The finetuned θ of a run directory, its leaves raveled into one vector."""
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(model.load(run).params)])


@pytest.mark.slow
def test_two_devices_and_two_processes_give_the_trajectory_of_one_and_stop_together(tiny_pretrain, split_finetune,
                                                                                     tmp_path):
    """6 outer steps of implicit with the KL term (β = 0.1), the batch on 1 device, split over the 2 host
    devices of this process (the session's split_finetune run), and over 2 processes joined by
    jax.distributed (gloo). 2 devices against 1: the logged reward, gradient norm and KL of every step
    within 1e-5 and the final θ within 1e-3 of its scale (module docstring). The 2 processes: process 1
    receives SIGTERM after 4 rows (steps 0-3 logged); both stop after step 3, decided together, write
    the checkpoint of step 3 and exit 143; run again, they resume from it and end with the rows (clock
    aside) and the θ of the uninterrupted 2-device run, bit for bit: the same computations on the same
    batch halves, and a sum of two halves is the same in either order. This is finetuning's kill and
    resume check (its queue, Adam state and θ restored); only process 0 writes and prints."""
    args = ["finetune", "--from", tiny_pretrain, *SPLIT_FINETUNE]
    invoke(*args, "--devices", 1, "--out", tmp_path / "d1", check=True)
    base, split = rows(tmp_path / "d1"), rows(split_finetune)
    assert [r["step"] for r in base] == [r["step"] for r in split] == list(range(7))
    for key in ("reward_mean", "grad_norm", "kl"):
        assert max_relative([r.get(key, 0.0) for r in base], [r.get(key, 0.0) for r in split]) < 1e-5, key
    assert max_relative(flat_theta(tmp_path / "d1"), flat_theta(split_finetune)) < 1e-3

    stopped = cluster(args, tmp_path / "procs", per_process=({}, {"IDIFF_TEST_KILL_AFTER_ROWS": "4:TERM"}))
    outputs = [p.communicate(timeout=900)[0] for p in stopped]
    assert [p.returncode for p in stopped] == [143, 143], outputs
    assert all("stopped by SIGTERM at step 3;" in " ".join(out.split()) for out in outputs), outputs
    assert [r["step"] for r in rows(tmp_path / "procs")] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "procs" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    procs = cluster(args, tmp_path / "procs")
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "resuming from checkpoint step 3" in outputs[0], outputs[0]
    assert "on 2 device(s) / 2 process(es)" in " ".join(outputs[0].split())
    assert "finetune" not in outputs[1] and "done:" not in outputs[1]  # process 1 prints nothing of the run
    assert rows(tmp_path / "procs", drop=CLOCK) == rows(split_finetune, drop=CLOCK)  # one writer: no row twice
    np.testing.assert_array_equal(flat_theta(tmp_path / "procs"), flat_theta(split_finetune))
    assert sorted(p.name for p in (tmp_path / "procs" / "samples").iterdir()) == \
        sorted(p.name for p in (split_finetune / "samples").iterdir())


@pytest.mark.slow
def test_a_killed_process_makes_the_other_exit_with_an_error_in_bounded_time(tiny_pretrain, tmp_path):
    """Process 1 is SIGKILLed once rows are logged; process 0 fails in its next collective (gloo: the
    connection is reset) and ends with one line and exit code 1, or, blocked elsewhere, when the
    coordination service misses process 1's heartbeat (IDIFF_HEARTBEAT_TIMEOUT_S=10 here; 100 s by
    default): within 60 s either way."""
    out = tmp_path / "procs"
    procs = cluster(["finetune", "--from", tiny_pretrain, *SPLIT_FINETUNE, "--steps", "400", "--sample-every", "400",
                     "--ckpt-every", "400"], out, IDIFF_HEARTBEAT_TIMEOUT_S="10")
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[0]
        time.sleep(1)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    output = procs[0].communicate(timeout=200)[0]
    procs[1].communicate()
    assert procs[0].returncode != 0
    assert time.monotonic() - killed < 60
    if procs[0].returncode == 1:  # the collective failed: one line, no traceback
        assert "Traceback" not in output, output[-3000:]
        assert output.strip().splitlines()[-1].startswith("error: process 0 of 2 stopped: "), output[-3000:]
    else:  # the coordination service ended it
        assert any(m in output for m in ("heartbeat", "another task died")), output[-3000:]
