"""`idiff finetune` with its image batches split over devices and processes (implicit/per_device.py).

Splitting the batch changes only the order in which the batch's contributions are summed (the reward
and KL means, the weight gradients): the random draws do not depend on the split (the partitionable
threefry's, element by element; a device's rows of the whole batch's draw inside `shard_map`). So 2
host devices must give the trajectory of 1 device to rounding. The float64 oracle of the per-device
parts (1e-10 relative; the queue's advance, the adjoint walks, implicit's Γ over 2M + 2 outer steps) is
tests/test_sharded_parts.py, on the 1-D Gaussian problem; here the whole command, in float32: the
logged metrics agree to 1e-5 (observed 2.3e-7), θ to 1e-3 of its scale (observed 3.2e-4): Adam divides
each gradient coordinate by its own RMS, so a rounding difference in a coordinate whose gradient is
itself at rounding size moves θ by up to lr per step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import cli, cluster, invoke, rows
from suite_env import xla_flags

from idiff_cli import sharding
from idiff_cli.errors import UserError

TINY = ["--T", "2", "--M", "2", "--batch", "4", "--steps", "5", "--log-every", "1", "--sample-every", "5",
        "--ckpt-every", "5", "--grid-n", "4", "--kl-n", "4", "--lr", "0.01"]
METHODS = {"implicit": ["--method", "implicit"], "nested": ["--method", "nested"]}
# Runs `idiff finetune` for --devices 1 and 2 in one process (θ0 cast to `dtype`) for each method given as
# a JSON {name: flags}, prints per method the largest relative differences of the logged metrics and of
# the final θ between the two
SCRIPT = """
import dataclasses, json, pathlib, sys
import jax, numpy as np
dtype, pre, out, methods, *args = sys.argv[1:]
jax.config.update("jax_enable_x64", dtype == "float64")
from idiff_cli.implicit import finetune as F
from idiff_cli.cli import app
load = F.load
def cast(path):
    m = load(path)
    return dataclasses.replace(m, params=jax.tree.map(lambda x: np.asarray(x, dtype), m.params))
F.load = cast
main = F.main
def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-300))
for name, flags in json.loads(methods).items():
    states = []
    F.main = lambda cfg, out: states.append(main(cfg, out))
    for n in (1, 2):
        app(["finetune", "--from", pre, *args, *flags, "--devices", str(n), "--out", f"{out}/{name}/d{n}"],
            standalone_mode=False)
    rows = [[json.loads(l) for l in open(f"{out}/{name}/d{n}/metrics.jsonl")] for n in (1, 2)]
    metrics = max(rel([r.get(k, 0.0) for r in rows[0]], [r.get(k, 0.0) for r in rows[1]])
                  for k in ("reward_mean", "grad_norm", "kl"))
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.params)]) for s in states]
    theta = rel(*flat)  # on θ's scale: some leaves (zero-gradient biases) stay at rounding-noise size
    print(json.dumps({"method": name, "metrics": metrics, "theta": theta, "steps": len(rows[0]) - 1,
                      "dtype": str(jax.tree.leaves(states[1].params)[0].dtype)}))
"""

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
    result = invoke("finetune", "--from", tiny_pretrain, *TINY, "--batch", "3", "--kl-n", "3", "--devices", "2",
                    "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --devices 2 on 1 process(es) does not divide")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dtype, methods, bounds", [("float32", ("implicit", "nested"), (1e-5, 1e-3))])
def test_two_devices_give_the_trajectory_of_one(dtype, methods, bounds, tiny_pretrain, tmp_path):
    """5 outer steps with the KL term (β = 0.1): the logged reward, gradient norm and KL of every step
    and the final θ, 2 host devices against 1, for implicit (the per-device queue and walk) and nested
    (the per-device walk of a whole path)."""
    chosen = json.dumps({name: METHODS[name] for name in methods})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, dtype, str(tiny_pretrain), str(tmp_path), chosen, *TINY],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": xla_flags(2)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert [(f["method"], f["dtype"], f["steps"]) for f in found] == [(m, dtype, 5) for m in methods]
    for f in found:
        assert f["metrics"] < bounds[0] and f["theta"] < bounds[1], f


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_to_one_resume_and_give_the_single_process_run(tiny_pretrain,
                                                                                               tmp_path):
    """Process 1 receives SIGTERM after 4 rows (steps 0-3 logged): both processes stop after step 3,
    decided together, write the one checkpoint of step 3 and exit 143; run again, they resume from it
    and log the rows of the single-process run (rtol 1e-4: float32 sums in another order); only
    process 0 writes and prints."""
    args = ["finetune", "--from", tiny_pretrain, *TINY]
    single = cli(*args, "--devices", 1, "--out", tmp_path / "one", env={"XLA_FLAGS": xla_flags(1)})
    stopped = cluster(args, tmp_path / "procs", per_process=({}, {"IDIFF_TEST_KILL_AFTER_ROWS": "4:TERM"}))
    outputs = [p.communicate(timeout=900)[0] for p in stopped]
    assert [p.returncode for p in stopped] == [143, 143], outputs
    assert all("stopped by SIGTERM at step 3;" in " ".join(out.split()) for out in outputs), outputs
    assert [r["step"] for r in rows(tmp_path / "procs")] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "procs" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    procs = cluster(args, tmp_path / "procs")
    outputs = [p.communicate(timeout=900)[0] for p in (single, *procs)]
    assert [p.returncode for p in (single, *procs)] == [0, 0, 0], outputs
    assert "resuming from checkpoint step 3" in outputs[1], outputs[1]
    assert "on 2 device(s) / 2 process(es)" in " ".join(outputs[1].split())
    assert "finetune" not in outputs[2] and "done:" not in outputs[2]  # process 1 prints nothing of the run
    base, joined = rows(tmp_path / "one"), rows(tmp_path / "procs")
    assert [r["step"] for r in joined] == list(range(6))  # one writer: no row twice
    for key in ("reward_mean", "grad_norm", "kl"):
        np.testing.assert_allclose([r.get(key, 0.0) for r in joined], [r.get(key, 0.0) for r in base], rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "procs" / "samples").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "samples").iterdir())


@pytest.mark.slow
def test_a_killed_process_makes_the_other_exit_with_an_error_in_bounded_time(tiny_pretrain, tmp_path):
    """Process 1 is SIGKILLed once rows are logged; process 0 fails in its next collective (gloo: the
    connection is reset) and ends with one line and exit code 1, or, blocked elsewhere, when the
    coordination service misses process 1's heartbeat (IDIFF_HEARTBEAT_TIMEOUT_S=10 here; 100 s by
    default): within 60 s either way."""
    out = tmp_path / "procs"
    procs = cluster(["finetune", "--from", tiny_pretrain, *TINY, "--steps", "400", "--sample-every", "400",
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
