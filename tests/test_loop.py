"""The run loop on a toy unit (a noisy counter): resume repeats the uninterrupted run's rows, the
resume rule (defining vs run-time options), hooks, the non-finite guard, signals, the run lock."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError
from idiff_cli.loop import SIGNAL_HOOK, Hook, Run, Unit
from idiff_cli.runs import RunDir

SCHEMA = cfglib.Schema("toy", "A toy command.", (
    cfglib.Option("lr", float, 0.5, "Step size.", positive=True),
    cfglib.Option("steps", int, 12, "Steps.", minimum=1, defining=False),
    cfglib.Option("log_every", int, 2, "Log every N steps.", minimum=1, defining=False),
    cfglib.Option("ckpt_every", int, 4, "Checkpoint every N steps.", minimum=1, defining=False),
    cfglib.seed_option(),
    *cfglib.tracking_options(),
))


def toy_unit(cfg, poison_at=None, hook_calls=None, delay=0.0, size=1, chunk=None, means=False):
    """x_{k+1} = x_k − lr·x_k + noise(fold_in(key, k)), one dispatched step each (`loop.dispatch`: a chunk
    stops early on a signal, as pretrain's and finetune's do); rows at multiples of log_every, dispatched
    `chunk` steps at a time (default log_every); with `means`, one row per chunk, the mean of its x and
    its step count (as pretrain logs). With `delay`, each step sleeps that long."""
    key = jax.random.key(cfg.seed)

    @jax.jit
    def jitted(x, k):
        return x - cfg.lr * x + 0.1 * jax.random.normal(jax.random.fold_in(key, k))

    def step(state, k):
        x = jitted(state["x"], k)
        time.sleep(delay)
        return {**state, "x": x, "step": state["step"] + 1}, x

    def rows(start, outputs, seconds):
        if means:
            return [{"step": start + len(outputs), "x_mean": float(np.mean(outputs)), "n": len(outputs)}]
        logged = [(k, x) for k, x in enumerate(outputs, start + 1) if k % cfg.log_every == 0 or k == cfg.steps]
        return [{"step": k, "x": float(x) if k != poison_at else float("nan")} for k, x in logged]

    def hook(state, k):
        if hook_calls is not None:
            hook_calls.append(k)
        return {"x_squared": float(state["x"]) ** 2}

    def init():
        time.sleep(10 * delay)  # stands for compiling
        return {"x": jnp.asarray(1.0), "step": jnp.asarray(0), "ballast": jax.random.normal(key, (size,))}

    return Unit(cfg.steps, init, step=step, rows=rows, chunk=chunk or cfg.log_every, finite=("x",), hooks=(Hook(6, hook),),
                first_rows=lambda state: [{"step": 0, "x": float(state["x"])}])


def run(out, poison_at=None, hook_calls=None, delay=0.0, size=1, chunk=None, means=False, **values):
    cfg = SCHEMA.resolve(values)
    with Run(SCHEMA, cfg, RunDir(out), cfg.ckpt_every) as r:
        return r.run(toy_unit(cfg, poison_at, hook_calls, delay, size, chunk, means))


def in_subprocess(out, env=None, **values):
    """The toy run in a child process (its own signal handlers); stderr carries the loop's messages."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_loop\n"
            "from idiff_cli.signals import Interrupted\n"
            f"try: test_loop.run({str(out)!r}, **{values!r})\n"
            "except Interrupted as e: print(e, file=sys.stderr); sys.exit(e.code)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_rows(out, n, proc, timeout=60):
    deadline = time.time() + timeout
    while len(RunDir(out).read_metrics()) < n:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


def rows(out):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in RunDir(out).read_metrics()]


def test_a_run_extended_in_two_parts_logs_the_uninterrupted_rows(tmp_path):
    """Run to step 6 (checkpoints at 4 and 6), then re-run with --steps 12 into the same directory: the rows
    and the final state equal one run to 12, though the first part's step-6 row came from the end of a run."""
    whole = run(tmp_path / "whole")
    run(tmp_path / "parts", steps=6)
    second = run(tmp_path / "parts")
    assert rows(tmp_path / "parts") == rows(tmp_path / "whole")
    assert float(second["x"]) == float(whole["x"])
    assert [r["step"] for r in rows(tmp_path / "whole")] == [0, 2, 4, 6, 8, 10, 12]
    assert "x_squared" in rows(tmp_path / "whole")[3] and "x_squared" in rows(tmp_path / "whole")[-1]


def test_rows_after_the_last_checkpoint_are_written_once_on_resume(tmp_path):
    """A run stopped by the non-finite guard at step 10 keeps its checkpoint 8 and rows up to 10; the
    re-run drops the rows after 8 and writes 10 and 12 once."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match="x is nan at step 10; checkpoint 8 is kept"):
        run(out, poison_at=10)
    assert [r["step"] for r in rows(out)][-1] == 8
    assert sorted((out / "checkpoints").iterdir())[-1].name == "8"
    run(out)
    run(tmp_path / "whole")
    assert rows(out) == rows(tmp_path / "whole")


@pytest.mark.slow  # several runs of the loop
def test_a_torn_last_row_is_dropped_and_logged_again_or_named_lost(tmp_path, capsys):
    """The last row of metrics.jsonl (step 8, whose checkpoint is 8) cut at every byte offset, as an
    append cut short by a crash leaves it. Without checkpoint 8 (the crash came before it), the re-run
    resumes from 4, drops the torn text and logs 6 and 8 again: the rows of the uninterrupted run, each
    step once. With checkpoint 8 (the file system lost an append that had returned), the finished run
    rewrites the file without the torn text and names step 8 as lost (checked at three offsets: the
    message is the same code); a later append starts its own line."""
    whole = tmp_path / "whole"
    run(whole, steps=8)
    text = (whole / "metrics.jsonl").read_bytes()
    head = text[:text.rstrip(b"\n").rfind(b"\n") + 1]
    cuts = range(len(head), len(text))
    for cut, keep_last in [(c, False) for c in cuts] + [(c, True) for c in (cuts[1], cuts[len(cuts) // 2], cuts[-1])]:
        out = tmp_path / f"cut{cut}-{keep_last}"
        shutil.copytree(whole, out)
        (out / "metrics.jsonl").write_bytes(text[:cut])
        if not keep_last:
            shutil.rmtree(out / "checkpoints" / "8")
        capsys.readouterr()
        run(out, steps=8)
        said = capsys.readouterr().err
        if cut == len(head):  # a clean cut at a line's end: nothing torn
            assert "torn" not in said
        elif b'"step": 8,' not in text[len(head):cut]:
            assert "dropped it; the step it held cannot be read" in " ".join(said.split()), said
        elif keep_last:
            assert "dropped it; the row of step 8 is lost" in " ".join(said.split()), said
        else:
            assert "dropped it; its step is logged again" in " ".join(said.split()), said
        assert rows(out) == (rows(whole)[:-1] if keep_last else rows(whole)), cut
        assert (out / "metrics.jsonl").read_bytes().endswith(b"\n")


@pytest.mark.parametrize("poison_at, message", [(3, "no checkpoint was saved before it"), (7, "checkpoint 4 is kept")])
def test_the_guard_keeps_the_finite_rows_of_its_chunk_and_names_the_checkpoint_kept(tmp_path, poison_at, message):
    """A row per step, 4 steps per chunk, checkpoints at 4 and 8: the rows of the chunk before the
    non-finite one are written, and the message says which checkpoint a re-run resumes from (none
    before the first)."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match=f"^x is nan at step {poison_at}; {message}$"):
        run(out, poison_at=poison_at, log_every=1, chunk=4)
    assert [r["step"] for r in rows(out)] == list(range(poison_at))


def test_run_time_options_may_change_and_defining_ones_may_not(tmp_path):
    out = tmp_path / "run"
    calls = []
    run(out, steps=4, hook_calls=calls)
    run(out, steps=8, log_every=4, ckpt_every=8, hook_calls=calls)  # run-time options changed: resumes
    assert calls == [4, 6, 8]  # the end of each part and the hook's cadence
    assert json.loads((out / "config.json").read_text())["log_every"] == 4
    with pytest.raises(UserError, match=r"other defining options \(--lr 0.5 -> 0.25\)"):
        run(out, lr=0.25)
    with pytest.raises(UserError, match="is at step 8; --steps must be at least that"):
        run(out, steps=6)


def test_a_run_directory_of_another_command_is_refused(tmp_path):
    out = tmp_path / "run"
    RunDir(out).create().write_json("config.json", {"command": "pretrain"})
    with pytest.raises(UserError, match="holds an `idiff pretrain` run"):
        run(out)


def test_nothing_is_created_before_the_claim_on_entering_the_run(tmp_path):
    """Bad values are refused by the schema, before any Run exists; a Run built but not entered (a
    command's start-up failing after it) creates nothing; entering it claims the directory."""
    with pytest.raises(UserError, match="--lr must be > 0"):
        run(tmp_path / "never", lr=-1.0)
    assert not (tmp_path / "never").exists()
    cfg = SCHEMA.resolve({})
    pending = Run(SCHEMA, cfg, RunDir(tmp_path / "later"), cfg.ckpt_every)
    assert not (tmp_path / "later").exists()
    with pending:
        assert json.loads((tmp_path / "later" / "config.json").read_text())["command"] == "toy"
        with pytest.raises(UserError, match="in use by another run"):
            Run(SCHEMA, cfg, RunDir(tmp_path / "later"), cfg.ckpt_every).__enter__()
    with Run(SCHEMA, cfg, RunDir(tmp_path / "later"), cfg.ckpt_every):  # released on leaving
        pass


def test_a_start_up_error_inside_the_run_leaves_nothing_behind(tmp_path):
    """An error before the first row (a unit that cannot be built or started) removes the directory the
    run made; a directory that was there before is kept, and so is a run that wrote rows."""
    cfg = SCHEMA.resolve({})

    def failing_init():
        raise UserError("cannot start")

    for out in (tmp_path / "fresh", tmp_path / "there"):
        if out.name == "there":
            out.mkdir()
        with pytest.raises(UserError, match="cannot start"):
            with Run(SCHEMA, cfg, RunDir(out), cfg.ckpt_every) as r:
                r.run(Unit(cfg.steps, failing_init, step=lambda state, k: (state, None)))
    assert not (tmp_path / "fresh").exists() and (tmp_path / "there" / "config.json").exists()
    with pytest.raises(UserError, match="x is nan at step 4"):
        run(tmp_path / "rows", poison_at=4)
    assert (tmp_path / "rows" / "metrics.jsonl").exists()


@pytest.mark.slow  # two runs of the loop
def test_sigterm_stops_at_the_next_step_saves_and_the_rerun_repeats_the_uninterrupted_rows(tmp_path):
    out = tmp_path / "run"
    proc = in_subprocess(out, steps=400, log_every=4, ckpt_every=100, delay=0.01)
    wait_for_rows(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    stopped = int(err.split("at step ")[1].split(";")[0])
    assert 6 <= stopped < 400 and "Resume: re-run the same command with --out" in err, err
    assert max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == stopped
    run(out, steps=400, log_every=4, ckpt_every=100)
    run(tmp_path / "whole", steps=400, log_every=4, ckpt_every=100)
    assert rows(out) == rows(tmp_path / "whole")


@pytest.mark.slow  # two runs of the loop
def test_rows_of_a_chunk_cut_by_a_signal_are_the_uninterrupted_rows(tmp_path):
    """Stops inside chunks (step 5 of 4..6, step 9 of 8..12) log no partial row: the chunk's outputs
    travel in the checkpoint and the resumed run completes the chunk, so the means over each chunk
    and their step counts are the uninterrupted run's (floats to 1e-6)."""
    out, options = tmp_path / "run", dict(steps=12, log_every=4, ckpt_every=100, means=True)
    for at in (5, 9):
        proc = in_subprocess(out, env={SIGNAL_HOOK: str(at)}, **options)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143 and f"at step {at};" in err, err
    run(out, **options)
    run(tmp_path / "whole", **options)
    cut, whole = rows(out), rows(tmp_path / "whole")
    assert [r["step"] for r in cut] == [r["step"] for r in whole] == [0, 4, 6, 8, 12]  # the hook every 6
    assert [r.get("n") for r in cut] == [r.get("n") for r in whole] == [None, 4, 2, 2, 4]
    np.testing.assert_allclose([r["x_mean"] for r in cut[1:]], [r["x_mean"] for r in whole[1:]], rtol=1e-6)


@pytest.mark.slow  # runs in child processes
def test_a_second_signal_ends_the_run_at_once_and_a_signal_while_compiling_saves_nothing(tmp_path):
    out = tmp_path / "run"
    proc = in_subprocess(out, steps=100, log_every=4, ckpt_every=4, delay=0.5)
    wait_for_rows(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    # two signals before the handler runs would be delivered as one; the second comes while the step
    # in progress still sleeps (a loaded machine may take a while to run the handler)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # ended by the signal itself, not by a checkpoint and exit
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 100
    run(out, steps=100, log_every=4, ckpt_every=100)  # from the last good checkpoint
    run(tmp_path / "whole", steps=100, log_every=4, ckpt_every=100)
    assert rows(out) == rows(tmp_path / "whole")

    fresh = tmp_path / "compiling"
    proc = in_subprocess(fresh, steps=40, delay=1.0)  # init sleeps 10 s: the "compile"
    deadline = time.time() + 30
    while not (fresh / "config.json").exists():
        assert time.time() < deadline
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and time.time() - t0 < 5
    assert not any((fresh / "checkpoints").glob("[0-9]*"))


def test_a_second_run_on_a_directory_in_use_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    proc = in_subprocess(out, steps=400, delay=0.05)
    wait_for_rows(out, 2, proc)
    try:
        with pytest.raises(UserError, match=rf"in use by another run \(pid {proc.pid}\)"):
            run(out, steps=400)
    finally:
        proc.kill()
        proc.communicate()
    run(out, steps=8)  # the killed holder left no stale lock


@pytest.mark.parametrize("where, message", [("file", "exists and is not a directory"),
                                            ("file/below", "which is not a directory"),
                                            ("/proc/idiff-test/run", "cannot create --out")])
def test_an_out_that_cannot_be_a_run_directory_is_one_line_and_creates_nothing(tmp_path, where, message):
    (tmp_path / "file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message):
        run(tmp_path / where if not where.startswith("/") else where)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow  # runs in child processes
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path):
    """SIGKILL between orbax's commit of step 8 and its manifest (the checkpoint writer's test hook):
    step 8 counts as cut short, the re-run warns, sets it aside and repeats steps 5-8 exactly."""
    out = tmp_path / "run"
    proc = in_subprocess(out, env={"IDIFF_TEST_KILL_AT_CHECKPOINT": "8"}, steps=40, log_every=4, ckpt_every=4)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "8").is_dir() and not (out / "checkpoints" / "8" / "idiff_manifest.json").exists()
    run(out, steps=40, log_every=4, ckpt_every=4)
    run(tmp_path / "whole", steps=40, log_every=4, ckpt_every=4)
    assert rows(out) == rows(tmp_path / "whole")
    assert (out / "checkpoints" / "damaged" / "8").is_dir()


FULL_DISK = """
import json, os, sys
sys.path.insert(0, {tests!r})
import test_loop
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir
from idiff_cli.checkpoint import Checkpointer
out = {out!r}
try:
    test_loop.run(out, steps=400, log_every=4, ckpt_every=4, size=200000)
    print(json.dumps({{"error": None}}))
except UserError as e:
    with Checkpointer(out + "/checkpoints") as ckpt:
        steps = ckpt.all_steps()
        intact = all(ckpt.damage(s) is None for s in steps)
    rows = RunDir(out).read_metrics()
    partial = [p for p in os.listdir(out + "/checkpoints") if "tmp" in p]
    print(json.dumps({{"error": str(e), "steps": steps, "intact": intact, "rows": [r["step"] for r in rows],
                      "partial": partial}}))
"""


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint_and_metrics(tmp_path):
    """A 2 MiB tmpfs in a private mount namespace fills while the run writes its checkpoints (800 kB
    of random numbers each, two kept): one line names the disk, the checkpoints written before are intact, metrics stop at a
    checkpoint's step or later with no torn row."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare -m: {probe.stderr.decode().strip()})")
    script = FULL_DISK.format(tests=os.path.dirname(__file__), out=str(mount / "run"))
    result = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=2m tmpfs "{mount}" && '
                             f'exec "{sys.executable}" -c "$0"', script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] and "no space left on the device" in report["error"], report
    assert report["steps"] and report["intact"], report
    assert report["rows"][-1] >= report["steps"][-1], report
    assert report["rows"] == sorted(set(report["rows"]))
    assert report["partial"] == [] and "absl" not in result.stderr, result.stderr  # orbax's partial step and logs
