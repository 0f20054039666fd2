"""One kill-and-resume harness for every long command: a run SIGKILLed at a deterministic point (after
N metrics rows; during a checkpoint write, between orbax's commit and the manifest) or sent SIGTERM
(it saves a checkpoint at its next step boundary and exits 143 with the resume command), then the same
command again into the same --out, logs exactly the rows of an uninterrupted run (wall-clock fields
aside) and saves the same arrays. The killed run is a real process; the reference and the resumed
runs run in-process (the same two host devices, the same keys: equal bit for bit)."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import TINY_UNET
from helpers import CLOCK, IDIFF, assert_same_arrays, invoke, rows

pytestmark = pytest.mark.slow

COMMANDS = {
    "langevin-reward": ["langevin", "--method", "implicit,langevin-theta-opt", "--steps", "60", "--batch", "32",
                        "--seeds", "2", "--log-every", "10", "--ckpt-every", "20"],
    "ebm-train": ["ebm-train", "--method", "implicit", "--steps", "60", "--batch", "64", "--seeds", "2",
                  "--log-every", "10", "--ckpt-every", "20", "--n-test", "500", "--no-samplers"],
    "pretrain": ["pretrain", "mnist", "--batch", "4", *TINY_UNET, "--steps", "6", "--log-every", "1",
                 "--ckpt-every", "2", "--sample-every", "6", "--sample-steps", "2", "--grid-n", "4"],
}
# (test hook, value, exit status): SIGKILL once 3 rows are written; SIGKILL while writing the checkpoint
# of step 4 (step 20 for the Langevin commands, whose checkpoints come every 20 steps); SIGTERM once 3
# rows are written, which the run answers by saving a checkpoint at its next step boundary (exit 143)
KILLS = {"rows": ("IDIFF_TEST_KILL_AFTER_ROWS", lambda command: "3", -signal.SIGKILL),
         "checkpoint": ("IDIFF_TEST_KILL_AT_CHECKPOINT",
                        lambda command: "20" if command in ("langevin-reward", "ebm-train") else "4", -signal.SIGKILL),
         "sigterm": ("IDIFF_TEST_KILL_AFTER_ROWS", lambda command: "3:TERM", 143)}

# Which kill points each command meets. The kill handling (rows beyond the last checkpoint dropped, a
# torn checkpoint ignored, SIGTERM answered at a step boundary) is loop.run's, one code for every command:
# every point is checked on the cheapest command; each other command meets one, which checks that its own
# state (the seeds' chains, data position, optimiser) saves and restores. Finetuning's (the adjoint's
# queue, Adam, θ) is checked by a SIGTERM to one process of a 2-process run, resumed to the rows and θ
# of the uninterrupted run (test_finetune_sharded.py).
CASES = [("langevin-reward", kill) for kill in sorted(KILLS)] + [("ebm-train", "rows"), ("pretrain", "checkpoint")]

_reference: dict = {}  # command -> its uninterrupted run's directory


@pytest.mark.parametrize("command, kill", CASES)
def test_a_killed_run_resumes_to_the_uninterrupted_rows(command, kill, tmp_path_factory):
    args = COMMANDS[command]
    if command not in _reference:
        whole = tmp_path_factory.mktemp("whole") / command
        invoke(*args, "--out", whole, check=True)
        _reference[command] = whole
    whole = _reference[command]
    cut = tmp_path_factory.mktemp("cut") / command
    variable, value, status = KILLS[kill]
    proc = subprocess.run([sys.executable, *IDIFF, *args, "--out", str(cut)],
                          env={**os.environ, variable: value(command)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, proc.stderr
    if kill == "sigterm":
        assert "stopped by SIGTERM at step" in proc.stderr and "checkpoint saved" in proc.stderr, proc.stderr
    assert 0 < len(rows(cut)) < len(rows(whole))
    invoke(*args, "--out", cut, check=True)
    assert rows(cut, drop=CLOCK) == rows(whole, drop=CLOCK)
    assert_same_arrays(whole, cut)
