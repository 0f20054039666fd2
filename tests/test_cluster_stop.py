"""SIGTERM to one process of a 2-process run (jax.distributed on 127.0.0.1, gloo, one device each):
every process stops after the same step, decided collectively (`loop.dispatch` every `AHEAD` steps
inside a chunk, `Run` at every chunk's end), one checkpoint is written there by both, and the same
command run again on both processes resumes from it and finishes."""

import re
import signal
import time

import pytest
from conftest import TINY_UNET
from helpers import cluster, rows

PRETRAIN = ["pretrain", "mnist", "--steps", "400", "--batch", "4", *TINY_UNET, "--log-every", "40",
            "--ckpt-every", "400", "--sample-every", "400", "--sample-steps", "2", "--grid-n", "4"]


def stop_steps(outputs) -> list[int]:
    """The step each process says it stopped at."""
    return [int(re.search(r"stopped by SIGTERM at step (\d+);", " ".join(out.split())).group(1)) for out in outputs]


@pytest.mark.slow
def test_sigterm_to_one_pretrain_process_stops_both_after_one_step_and_the_rerun_resumes(tmp_path):
    """Process 1 is signalled mid-chunk (after the first row, at step 40 of 400, while steps are being
    dispatched): both exit 143 naming the same step, checkpoints/ holds that one step, and the re-run
    resumes there and logs every 40th step to the end."""
    out = tmp_path / "run"
    procs = cluster(PRETRAIN, out)
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").exists() and rows(out)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].communicate()[0]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outputs
    steps = stop_steps(outputs)
    assert steps[0] == steps[1] and 40 <= steps[0] < 400, outputs
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [str(steps[0])]

    again = cluster(PRETRAIN, out)
    outputs = [p.communicate(timeout=600)[0] for p in again]
    assert [p.returncode for p in again] == [0, 0], outputs
    assert f"resuming from checkpoint step {steps[0]}" in outputs[0]
    logged = [r["step"] for r in rows(out)]
    assert logged == sorted(set(range(40, 401, 40)) | {steps[0]}), logged
