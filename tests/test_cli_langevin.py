"""`idiff langevin-reward` end to end through the real CLI on tiny configs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import CLOCK, IDIFF, assert_same_arrays, error_line, invoke, rows

from idiff_cli.langevin import figures

TINY = ["--steps", "50", "--batch", "64", "--seeds", "2", "--log-every", "10"]
ALL_METHODS = ["implicit", "langevin-theta0", "nested-T1", "nested-T3", "unrolled-T1", "unrolled-T3",
               "guidance", "langevin-theta-opt"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "all"
    invoke("langevin-reward", *TINY, "--T", "1,3", "--out", str(out), check=True)
    return out


def test_all_methods_write_every_output(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["command"] == "langevin-reward" and config["T"] == [1, 3] and config["preset"] == "reference"
    logged = rows(tiny_run)
    assert sorted({r["method"] for r in logged}) == sorted(ALL_METHODS)
    for method in ALL_METHODS:
        mine = [r for r in logged if r["method"] == method]
        assert [r["step"] for r in mine] == [0, 10, 20, 30, 40, 50]
        assert all(np.isfinite(r["reward_mean"]) and np.isfinite(r["loglik_mean"]) for r in mine)
    arrays = np.load(tiny_run / "arrays.npz")
    assert arrays["theta_opt"].shape == (2, 6)
    assert arrays["implicit/theta"].shape == (6, 2, 6)
    assert arrays["nested-T3/final_x"].shape == (2, 2, 64)
    # θ_opt is implicit's final θ, and langevin-theta-opt keeps it fixed.
    np.testing.assert_array_equal(arrays["theta_opt"], arrays["implicit/theta"][-1])
    np.testing.assert_array_equal(arrays["langevin-theta-opt/theta"][-1], arrays["theta_opt"])
    assert not np.array_equal(arrays["theta_opt"], arrays["langevin-theta0/theta"][-1])
    assert sorted(p.name for p in (tiny_run / "figures").iterdir()) == [
        "fig10_dynamics.png", "fig10_sigma_theta.png", "fig4_samples_contours.png", "fig5_reward_loglik.png",
        "fig8_grad_evals.png", "fig9_bands.png"]


def test_nested_with_one_inner_step_equals_implicit(tiny_run):
    """Same keys, T = 1: the nested loop is Implicit Diffusion, bit for bit (Appendix A.1)."""
    arrays = np.load(tiny_run / "arrays.npz")
    np.testing.assert_array_equal(arrays["nested-T1/theta"], arrays["implicit/theta"])
    np.testing.assert_array_equal(arrays["nested-T1/final_x"], arrays["implicit/final_x"])
    assert not np.array_equal(arrays["nested-T3/theta"], arrays["implicit/theta"])


def test_report_redraws_the_logged_series(tiny_run, tmp_path, monkeypatch):
    """`idiff report RUN` plots metrics.jsonl's reward curves; two runs overlay one band per run."""
    drawn = []
    monkeypatch.setattr(figures.FigureDir, "save_figure", lambda self, fig, name: drawn.append((name, fig)) or self.path / name)
    invoke("report", str(tiny_run), "--out", str(tmp_path / "one"), check=True)
    fig5 = dict(drawn)["fig5_reward_loglik.png"]
    logged = rows(tiny_run, "implicit")
    implicit = next(line for line in fig5.axes[0].get_lines() if line.get_label() == "implicit")
    np.testing.assert_array_equal(implicit.get_xdata(), [r["step"] for r in logged])
    np.testing.assert_allclose(implicit.get_ydata(), [r["reward_mean"] for r in logged])
    drawn.clear()
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    invoke("report", str(tiny_run), str(copy), "--x", "grad_evals", "--out", str(tmp_path / "two"), check=True)
    (name, fig), = drawn
    nested = fig.axes[[a.get_title() for a in fig.axes].index("nested-T3")].get_lines()
    assert len(nested) == 2
    np.testing.assert_array_equal(nested[0].get_xdata(), [r["grad_evals"] for r in rows(tiny_run, "nested-T3")])


def test_one_baseline_runs_with_implicit_as_reference(tmp_path):
    invoke("langevin", *TINY, "--baseline", "nested", "--T", "2", "--out", str(tmp_path), check=True)
    assert {r["method"] for r in rows(tmp_path)} == {"implicit", "nested-T2"}


def test_method_plugin_through_the_cli(tmp_path, monkeypatch):
    """A method defined in a user module (builder(Components, T) -> Method) runs by `--method module:fn`."""
    (tmp_path / "my_methods.py").write_text(
        "from idiff_cli.langevin import methods as m\n\n"
        "def half_step(c, T):\n"
        "    sample = m.ula_sampler(m.potential_energy(c.potential), c.gamma / 2, 2 * T)\n"
        "    return m.trained(f'half-step-T{T}', 2 * T, sample, c.gradient, c.optimizer(1.0))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    invoke("langevin", *TINY, "--method", "my_methods:half_step", "--T", "2", "--out", str(out), check=True)
    mine = rows(out, "half-step-T2")
    assert [r["step"] for r in mine] == [0, 10, 20, 30, 40, 50] and mine[-1]["T"] == 4
    arrays = np.load(out / "arrays.npz")
    assert not np.array_equal(arrays["half-step-T2/theta"][-1], arrays["implicit/theta"][-1])


def test_config_file_and_preset_and_flag_precedence(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 20\nbatch = 32\nseeds = 2\ngamma = 0.05\nmethod = "implicit"\n')
    out = tmp_path / "run"
    invoke("langevin", "--preset", "paper", "--config", str(tmp_path / "c.toml"), "--steps", "30",
           "--out", str(out), check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["potential"] == "hexagon-paper" and config["theta0"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert config["steps"] == 30 and config["batch"] == 32 and config["gamma"] == 0.05


def test_reward_plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def right_half(x):\n    return (x[0] > 0).astype(x.dtype)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    invoke("langevin", *TINY, "--baseline", "implicit", "--reward", "my_rewards:right_half",
           "--out", str(out), check=True)
    assert 0.3 < rows(out)[0]["reward_mean"] < 0.7  # fraction of N(0, I) draws with x0 > 0


@pytest.mark.parametrize("args, message", [
    (["--reward", "nope"], "unknown reward 'nope'; valid choices: corner, corner-paper"),
    (["--baseline", "nope"], "unknown --method 'nope'; valid choices: all, guidance, implicit"),
    (["--batch", "-5"], "--batch must be > 0, got -5"),
    (["--T", "0"], "--T must be > 0, got 0"),
    (["--gamma", "nan"], "--gamma must be a finite number, got nan"),
    (["--lr-schedule", "cosine"], "unknown --lr-schedule 'cosine'; valid choices: constant, inv-sqrt"),
    (["--preset", "nope"], "unknown --preset 'nope'; valid choices: reference, paper"),
    (["--theta0", "1,2"], "--theta0 has 2 entries; potential 'hexagon' takes 6"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--ckpt-every", "15"], "--ckpt-every (15) must be a multiple of --log-every (10)"),
    (["--reward", "no_such_module:f"], "cannot import reward plug-in module 'no_such_module'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = invoke("langevin", *TINY, *args, "--out", str(tmp_path / "run"))
    assert message in error_line(result)
    assert not (tmp_path / "run").exists()


def test_another_defining_option_into_the_same_run_directory_is_refused(tiny_run):
    result = invoke("langevin", *TINY, "--T", "1,3", "--seed", "7", "--out", str(tiny_run))
    assert "other defining options (--seed 0 -> 7)" in error_line(result)


@pytest.mark.slow  # two runs
def test_resume_from_checkpoints_equals_one_run(tmp_path):
    """A run whose last checkpoint of `implicit` and every checkpoint of `langevin-theta-opt` are
    lost resumes implicit from step 40 and reruns theta-opt: rows and arrays equal the whole run's."""
    args = [*TINY, "--baseline", "implicit,langevin-theta-opt", "--ckpt-every", "10"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    invoke("langevin", *args, "--out", str(whole), check=True)
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "implicit" / "50")
    shutil.rmtree(cut / "checkpoints" / "langevin-theta-opt")
    (cut / "arrays.npz").unlink()
    result = invoke("langevin", *args, "--out", str(cut), check=True)
    assert "resuming implicit from checkpoint step 40" in result.output
    assert rows(cut, drop=CLOCK, sort=True) == rows(whole, drop=CLOCK, sort=True)
    assert_same_arrays(whole, cut)


@pytest.mark.slow  # two runs
def test_larger_steps_continue_the_run(tmp_path):
    """`implicit` run to step 20, then --steps 50 into the same --out: the rows and arrays of one
    50-step run; re-running the finished run adds nothing."""
    args = [*TINY[2:], "--baseline", "implicit", "--ckpt-every", "10"]
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    invoke("langevin", "--steps", "50", *args, "--out", str(whole), check=True)
    invoke("langevin", "--steps", "20", *args, "--out", str(grown), check=True)
    result = invoke("langevin", "--steps", "50", *args, "--out", str(grown), check=True)
    assert "resuming implicit from checkpoint step 20" in result.output
    assert rows(grown, drop=CLOCK) == rows(whole, drop=CLOCK)
    assert_same_arrays(whole, grown)
    invoke("langevin", "--steps", "50", *args, "--out", str(grown), check=True)
    assert rows(grown, drop=CLOCK) == rows(whole, drop=CLOCK)
    result = invoke("langevin", "--steps", "30", *args, "--out", str(grown))
    assert result.exit_code == 2 and "--steps must be at least that" in result.output


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point, in a fresh process: one line on stderr, exit code 2, no traceback."""
    proc = subprocess.run([sys.executable, *IDIFF, "langevin", "--steps", "-1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --steps must be > 0, got -1"
