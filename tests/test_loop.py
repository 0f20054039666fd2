"""The run loop on a toy unit (a noisy counter): resume repeats the uninterrupted run's rows, the
resume rule (defining vs run-time options), hooks, the non-finite guard."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli import config as cfglib
from idiff_cli.errors import UserError
from idiff_cli.loop import Hook, Run, Unit
from idiff_cli.runs import RunDir

SCHEMA = cfglib.Schema("toy", "A toy command.", (
    cfglib.Option("lr", float, 0.5, "Step size.", positive=True),
    cfglib.Option("steps", int, 12, "Steps.", minimum=1, defining=False),
    cfglib.Option("log_every", int, 2, "Log every N steps.", minimum=1, defining=False),
    cfglib.Option("ckpt_every", int, 4, "Checkpoint every N steps.", minimum=1, defining=False),
    cfglib.seed_option(),
))


def toy_unit(cfg, poison_at=None, hook_calls=None):
    """x_{k+1} = x_k − lr·x_k + noise(fold_in(key, k)); rows at multiples of log_every."""
    key = jax.random.key(cfg.seed)

    @jax.jit
    def step(x, k):
        return x - cfg.lr * x + 0.1 * jax.random.normal(jax.random.fold_in(key, k))

    def advance(state, start, n):
        x, rows = state["x"], []
        for k in range(start, start + n):
            x = step(x, k)
            if (k + 1) % cfg.log_every == 0 or k + 1 == cfg.steps:
                value = float(x) if k + 1 != poison_at else float("nan")
                rows.append({"step": k + 1, "x": value})
        return {"x": x}, rows

    def hook(state, k):
        if hook_calls is not None:
            hook_calls.append(k)
        return {"x_squared": float(state["x"]) ** 2}

    return Unit(cfg.steps, lambda: {"x": jnp.asarray(1.0)}, advance, chunk=cfg.log_every, finite=("x",),
                hooks=(Hook(6, hook),), first_rows=lambda state: [{"step": 0, "x": float(state["x"])}])


def run(out, poison_at=None, hook_calls=None, **values):
    cfg = SCHEMA.resolve(values)
    with Run(SCHEMA, cfg, RunDir(out), cfg.ckpt_every) as r:
        return r.run(toy_unit(cfg, poison_at, hook_calls))


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
    with pytest.raises(UserError, match="x is nan at step 10"):
        run(out, poison_at=10)
    assert [r["step"] for r in rows(out)][-1] == 8
    assert sorted((out / "checkpoints").iterdir())[-1].name == "8"
    run(out)
    run(tmp_path / "whole")
    assert rows(out) == rows(tmp_path / "whole")


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


def test_nothing_is_created_before_the_claim(tmp_path):
    """Bad values are refused by the schema, before any Run exists: no directory appears."""
    with pytest.raises(UserError, match="--lr must be > 0"):
        run(tmp_path / "never", lr=-1.0)
    assert not (tmp_path / "never").exists()
    assert np.isfinite(float(run(tmp_path / "ok", steps=2)["x"]))
