"""`idiff langevin-reward` end to end through the real CLI on tiny configs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from idiff_cli.cli import app

TINY = ["--steps", "50", "--batch", "64", "--seeds", "2", "--log-every", "10"]
ALL_METHODS = ["implicit", "langevin-theta0", "nested-T1", "nested-T3", "unrolled-T1", "unrolled-T3",
               "guidance", "langevin-theta-opt"]


def invoke(*args):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "all"
    result = invoke("langevin-reward", *TINY, "--T", "1,3", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_all_methods_write_every_output(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["steps"] == 50 and config["T"] == [1, 3] and config["preset"] == "reference"
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in rows}) == sorted(ALL_METHODS)
    for method in ALL_METHODS:
        mine = [r for r in rows if r["method"] == method]
        assert [r["step"] for r in mine] == [0, 10, 20, 30, 40, 50]
        assert all(r["grad_evals"] == r["step"] * r["T"] for r in mine)
        for r in mine:
            for metric in ("reward", "loglik"):
                assert r[f"{metric}_min"] <= r[f"{metric}_mean"] <= r[f"{metric}_max"]
                assert np.isfinite(r[f"{metric}_mean"])
    arrays = np.load(tiny_run / "arrays.npz")
    assert arrays["theta_opt"].shape == (2, 6)
    assert arrays["implicit/theta"].shape == (6, 2, 6)
    assert arrays["nested-T3/final_x"].shape == (2, 2, 64)
    # θ_opt is implicit's final θ, and langevin-theta-opt keeps it fixed.
    np.testing.assert_array_equal(arrays["theta_opt"], arrays["implicit/theta"][-1])
    np.testing.assert_array_equal(arrays["langevin-theta-opt/theta"][-1], arrays["theta_opt"])
    figures = sorted(p.name for p in (tiny_run / "figures").iterdir())
    assert figures == ["fig10_dynamics.png", "fig10_sigma_theta.png", "fig4_samples_contours.png",
                       "fig5_reward_loglik.png", "fig8_grad_evals.png"]
    assert all((tiny_run / "figures" / f).stat().st_size > 5000 for f in figures)


def test_nested_with_one_inner_step_equals_implicit(tiny_run):
    """Same keys, T = 1: the nested loop is Implicit Diffusion, bit for bit (Appendix A.1)."""
    arrays = np.load(tiny_run / "arrays.npz")
    np.testing.assert_array_equal(arrays["nested-T1/theta"], arrays["implicit/theta"])
    np.testing.assert_array_equal(arrays["nested-T1/final_x"], arrays["implicit/final_x"])
    assert not np.array_equal(arrays["nested-T3/theta"], arrays["implicit/theta"])


def test_one_baseline_runs_with_implicit_as_reference(tmp_path):
    result = invoke("langevin", *TINY, "--baseline", "nested", "--T", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    methods = {json.loads(line)["method"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert methods == {"implicit", "nested-T2"}


def test_config_file_and_preset_and_flag_precedence(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 20\nbatch = 32\nseeds = 2\ngamma = 0.05\nbaseline = "implicit"\n')
    out = tmp_path / "run"
    result = invoke("langevin", "--preset", "paper", "--config", str(tmp_path / "c.toml"), "--steps", "30",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["potential"] == "hexagon-paper" and config["theta0"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert config["steps"] == 30 and config["batch"] == 32 and config["gamma"] == 0.05


def test_reward_plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def right_half(x):\n    return (x[0] > 0).astype(x.dtype)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    result = invoke("langevin", *TINY, "--baseline", "implicit", "--reward", "my_rewards:right_half",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.3 < rows[0]["reward_mean"] < 0.7  # fraction of N(0, I) draws with x0 > 0


@pytest.mark.parametrize("args, message", [
    (["--reward", "nope"], "unknown reward 'nope'; valid choices: corner, corner-paper"),
    (["--baseline", "nope"], "unknown --baseline 'nope'; valid choices: all, guidance, implicit"),
    (["--batch", "-5"], "--batch must be an integer >= 1, got -5"),
    (["--T", "0"], "--T must be one or more integers >= 1, got (0,)"),
    (["--gamma", "nan"], "--gamma must be a finite number > 0, got nan"),
    (["--eta-schedule", "cosine"], "unknown --eta-schedule 'cosine'; valid choices: constant, inv-sqrt"),
    (["--preset", "nope"], "unknown preset 'nope'; valid choices: reference, paper"),
    (["--theta0", "1,2"], "--theta0 has 2 entries; potential 'hexagon' takes 6"),
    (["--reward", "no_such_module:f"], "cannot import reward plug-in module 'no_such_module'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = invoke("langevin", *TINY, *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point, in a fresh process: one line on stderr, exit code 2, no traceback."""
    proc = subprocess.run([sys.executable, "-c", "from idiff_cli.cli import main; main()", "langevin",
                           "--steps", "-1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --steps must be an integer >= 1, got -1"


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL after the first method is saved; re-running into the same --out skips it and the
    final outputs equal those of an uninterrupted run (same device count, same keys)."""
    import os
    import signal
    import time

    args = [*TINY, "--baseline", "implicit,guidance,langevin-theta-opt"]
    whole = tmp_path / "whole"
    assert invoke("langevin", *args, "--out", str(whole)).exit_code == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-c", "from idiff_cli.cli import main; main()", "langevin", *args,
                             "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def implicit_saved():  # its arrays, then all 6 of its metrics rows
        metrics = cut / "metrics.jsonl"
        return metrics.exists() and metrics.read_text().count('"implicit"') == 6

    deadline = time.time() + 120
    while not implicit_saved() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cut / "methods" / "implicit.npz").exists() and not (cut / "arrays.npz").exists()

    result = invoke("langevin", *args, "--out", str(cut))
    assert result.exit_code == 0, result.output
    assert "resuming: implicit" in result.output
    rows = lambda d: sorted(json.dumps(r, sort_keys=True) for r in  # noqa: E731
                            map(json.loads, (d / "metrics.jsonl").read_text().splitlines()))
    assert rows(cut) == rows(whole)
    a, b = np.load(whole / "arrays.npz"), np.load(cut / "arrays.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_another_config_into_the_same_run_directory_is_refused(tiny_run):
    result = invoke("langevin", *TINY, "--T", "1,3", "--seed", "7", "--out", str(tiny_run))
    assert result.exit_code == 2
    assert "holds a run with another config (differs in seed)" in result.output
