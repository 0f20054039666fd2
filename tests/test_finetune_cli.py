"""`idiff finetune` and `idiff report` end to end through the real CLI: a tiny pretrain, then 20 finetuning
steps with the brightness reward for λ > 0 (full adjoint, periodic FID) and λ < 0 (pipelined adjoint)
(issue 6, item 8), `idiff evaluate-fid` of a finetuned run, and bad input -> one line, exit 2."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fid_helpers import classifier_cache  # noqa: F401 (autouse fixture)
from idiff_cli.cli import app

TINY_PRETRAIN = ["--steps", "2", "--batch", "4", "--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1",
                 "--attn-resolutions", "14", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "2",
                 "--sample-steps", "2", "--grid-n", "4"]
TINY_FINETUNE = ["--T", "2", "--M", "2", "--batch", "4", "--steps", "20", "--log-every", "10",
                 "--sample-every", "20", "--ckpt-every", "10", "--grid-n", "4", "--lr", "0.01", "--beta", "0.1",
                 "--no-clip"]  # the 2-step model's samples lie mostly beyond [-1, 1]: clipped, they give no gradient

BRIGHTER = ["--fid-every", 20, "--fid-n", 4]  # the λ > 0 run also logs the periodic FID
DARKER = ["--adjoint", "pipelined"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    result = invoke("pretrain", "mnist", *TINY_PRETRAIN, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    for name, lam, extra in (("brighter", 10, BRIGHTER), ("darker", -10, DARKER)):
        result = invoke("finetune", "--from", pretrained, "--reward", "brightness", "--lambda", lam,
                        *TINY_FINETUNE, *extra, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_brightness_rises_for_positive_lambda_and_falls_for_negative(runs):
    """The fixed-key evaluation reward (16 → 4 images, same noise keys at steps 0 and 20) moves in the
    direction of λ by more than 0.01 (mean pixel value on [0, 1]). Measured moves: > 0.05 either way,
    from Adam with lr 1e-2 on a 2-step pretrained U-Net (a brightness gradient is easy to follow)."""
    for name, sign in (("brighter", 1), ("darker", -1)):
        ev = {r["step"]: r["eval_reward"] for r in rows(runs / name) if "eval_reward" in r}
        assert sorted(ev) == [0, 20]
        assert sign * (ev[20] - ev[0]) > 0.01, (name, ev)


def test_outputs_metrics_and_accounting(runs):
    run = runs / "brighter"
    metrics = rows(run)
    train = [r for r in metrics if "reward_mean" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all(np.isfinite(r["grad_norm"]) and r["reward_std"] >= 0 for r in train)
    assert [r["step"] for r in train if "kl" in r] == [10, 20] and all(r["kl"] >= 0 for r in train if "kl" in r)
    # implicit with M = T = 2, β > 0: per outer step L + T = 1 + 2 sequential calls after a warm-up of 1
    assert [r["sequential_calls"] for r in train[:2]] == [1 + 3, 1 + 6]
    assert np.all(np.diff([r["net_evals"] for r in train]) > 0)
    config = json.loads((run / "config.json").read_text())
    assert (config["M"], config["T"], config["batch"], config["lam"]) == (2, 2, 4, 10.0)
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000000.png", "step_000020.png"]
    assert (run / "figures" / "reward_kl.png").stat().st_size > 5000
    assert (run / "figures" / "evolution.png").stat().st_size > 500
    assert (run / "checkpoints" / "20").is_dir()
    assert [(r["step"], r["fid_n"]) for r in metrics if "fid" in r] == [(0, 4), (20, 4)]
    # the pipelined adjoint with M = T = 2: 2 sequential calls per outer step
    darker = [r for r in rows(runs / "darker") if "reward_mean" in r]
    assert np.all(np.diff([r["sequential_calls"] for r in darker]) == 2)


def test_evaluate_fid_and_sample_read_a_finetuned_run(runs):
    """A finetune run directory loads as its base model with the finetuned θ (finetuned.json, weights/):
    evaluate-fid records checkpoint 20, and its samples differ from the base model's with the same keys."""
    run = runs / "brighter"
    result = invoke("evaluate-fid", run, "--n", 4, "--batch", 4, "--sample-steps", 2)
    assert result.exit_code == 0, result.output
    fid = json.loads((run / "fid.json").read_text())
    assert fid["checkpoint"] == 20 and fid["n"] == 4 and np.isfinite(fid["value"])
    config = json.loads((run / "config.json").read_text())
    result = invoke("sample", run, "--n", 4, "--sample-steps", 2)  # the default name says "finetuned", not "ema"
    assert result.exit_code == 0, result.output
    finetuned = np.load(run / "samples" / "sample-step20-finetuned-euler-maruyama2-seed0-n4.npz")["images"].astype(int)
    result = invoke("sample", config["from_run"], "--n", 4, "--sample-steps", 2, "--out", runs / "base")
    assert result.exit_code == 0, result.output
    base = np.load(runs / "base.npz")["images"].astype(int)
    assert np.abs(finetuned - base).max() > 0
    result = invoke("sample", run, "--weights", "params")
    assert result.exit_code == 2 and "is a finetune run" in result.output and "Traceback" not in result.output


def test_rerun_into_a_finished_run_resumes_without_new_steps(runs, pretrained):
    before = rows(runs / "brighter")
    result = invoke("finetune", "--from", pretrained, "--reward", "brightness", "--lambda", 10, *TINY_FINETUNE,
                    *BRIGHTER, "--out", runs / "brighter")
    assert result.exit_code == 0, result.output
    assert rows(runs / "brighter") == before


def test_run_resumed_from_a_middle_checkpoint_logs_the_uninterrupted_metrics(runs, pretrained, tmp_path):
    """Checkpoint 10 of the pipelined run (both queues, Adam state, θ) restored through an abstract
    template: steps 11-20 repeat the uninterrupted run's metrics exactly (same program, same inputs)."""
    import shutil

    run = tmp_path / "darker"
    shutil.copytree(runs / "darker", run)
    shutil.rmtree(run / "checkpoints" / "20")
    shutil.rmtree(run / "weights" / "20")
    result = invoke("finetune", "--from", pretrained, "--reward", "brightness", "--lambda", -10, *TINY_FINETUNE,
                    *DARKER, "--out", run)
    assert result.exit_code == 0, result.output
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(rows(run)) == strip(rows(runs / "darker"))


def test_report_overlays_runs(runs, tmp_path):
    result = invoke("report", runs / "brighter", runs / "darker", "--x", "net_evals", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figures" / "reward_kl_net_evals.png").stat().st_size > 5000


PLUGIN = """
import jax.numpy as jnp

def raises(x):
    raise RuntimeError("broken reward")

def wrong_shape(x):
    return jnp.mean(x, axis=(1, 2))
"""


@pytest.mark.parametrize("args, message", [
    (["--reward", "red"], "error: reward 'red' needs images with >= 3 channels; this model makes 1-channel"),
    (["--reward", "ft_plugin:raises"], "error: reward 'ft_plugin:raises' fails on a batch of shape (2, 28, 28, 1): "
                                       "RuntimeError: broken reward"),
    (["--reward", "ft_plugin:wrong_shape"], "error: reward 'ft_plugin:wrong_shape' must map images [B, H, W, C] "
                                            "to [B] rewards; on a batch of shape (2, 28, 28, 1) it returned shape (2, 1)"),
    (["--reward", "sparkle"], "error: unknown image-reward 'sparkle'; valid choices: brightness, red"),
    (["--M", "3", "--T", "8"], "error: --M 3 must divide --T 8"),
    (["--method", "sideways"], "error: unknown finetune-method 'sideways'; valid choices:"),
    (["--sampler", "probability-flow"], "error: --sampler probability-flow is deterministic"),
])
def test_bad_input_is_one_line_and_exit_2(pretrained, tmp_path, monkeypatch, args, message):
    (tmp_path / "ft_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("finetune", "--from", pretrained, *args, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
