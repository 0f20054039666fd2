"""`idiff finetune` and its `idiff report` end to end through the CLI, on the session's tiny pretrained
model: 20 finetuning steps with the brightness reward (λ > 0, the pipelined adjoint, the reward on
x_{t_min}: --final-step none, the periodic FID and label_kept); the logged KL of the current θ with its
standard error; the finetuned run read by `sample` and `evaluate-fid`; the resume rule (defining
options must match, run-time ones may change); --method ddpo with the classifier reward digit:7 (a
sampling round and its 4 updates per outer step, resumed mid-run); bad input -> one line, exit 2; LoRA
adapters on the pixel U-Net. The full adjoint with the Tweedie final step runs through the CLI in the
session's split_finetune run (tests/conftest.py, tests/test_finetune_sharded.py)."""

import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLOCK, error_line, invoke, rows

from idiff_cli.diffusion import lora
from idiff_cli.diffusion.model import load
from idiff_cli.implicit import finetune, girsanov, report
from idiff_cli.implicit.options import SCHEMA
from idiff_cli.implicit.subject import subject_of

TINY_FINETUNE = ["--T", "2", "--M", "2", "--batch", "4", "--steps", "20", "--log-every", "10",
                 "--sample-every", "20", "--ckpt-every", "10", "--grid-n", "4", "--lr", "0.01", "--beta", "0.1",
                 "--no-clip"]  # the 2-step model's samples lie mostly beyond [-1, 1]: clipped, they give no gradient

# the module's run: the pipelined adjoint (a queue of adjoint states, saved in its checkpoints), the
# periodic FID and label_kept
BRIGHTER = ["--lambda", "10", "--adjoint", "pipelined", "--final-step", "none", "--fid-every", "20", "--fid-n", "4",
            "--label-every", "10", "--label-n", "256"]


def finetune_into(pretrained, out, *args):
    invoke("finetune", "--from", pretrained, *TINY_FINETUNE, *args, "--out", out, check=True)
    return out


# ddpo, 4 outer steps, each a round of 4 paths (slot i at step i + 1) and 2 passes of 2 minibatches of 2: the
# checkpoint at step 2 lies inside the run
DDPO = ["--method", "ddpo", "--reward", "digit:7", "--inner-epochs", "2", "--train-batch", "2", "--T", "2",
        "--M", "2", "--batch", "4", "--steps", "4", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "4",
        "--grid-n", "4", "--kl-n", "4", "--lr", "0.01", "--beta", "0.1"]


@pytest.fixture(scope="module")
def brighter(tiny_pretrain, tmp_path_factory):
    return finetune_into(tiny_pretrain, tmp_path_factory.mktemp("finetune") / "brighter", *BRIGHTER)


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_brightness_rises(brighter):
    """The fixed-key evaluation reward (4 images, the same noise keys at steps 0 and 20) rises by more
    than 0.01 (mean pixel value on [0, 1]): Adam with lr 1e-2 on a 2-step pretrained U-Net follows a
    brightness gradient easily."""
    ev = {r["step"]: r["eval_reward"] for r in rows(brighter) if "eval_reward" in r}
    assert sorted(ev) == [0, 20]
    assert ev[20] - ev[0] > 0.01, ev


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_outputs_and_metrics(brighter, tiny_pretrain):
    run = brighter
    metrics = rows(run)
    train = [r for r in metrics if "reward_mean" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train)
    config = json.loads((run / "config.json").read_text())
    assert (config["command"], config["M"], config["T"], config["batch"], config["lam"]) == ("finetune", 2, 2, 4, 10.0)
    assert (config["adjoint"], config["final_step"], config["kl_n"]) == ("pipelined", "none", 64)
    assert config["from_run"] == str(tiny_pretrain)
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000000.png", "step_000020.png"]
    assert {p.name for p in (run / "figures").iterdir()} >= {"reward_kl.png", "evolution.png"}
    assert (run / "checkpoints" / "20").is_dir() and (run / "weights" / "20").is_dir()
    assert json.loads((run / "finetuned.json").read_text())["step"] == 20
    assert [(r["step"], r["fid_n"]) for r in metrics if "fid" in r] == [(0, 4), (20, 4)]
    kept = {r["step"]: r["label_kept"] for r in metrics if "label_kept" in r}
    assert sorted(kept) == [0, 10, 20] and kept[0] == 1.0 and all(0 <= v <= 1 for v in kept.values()), kept
    assert (run / "labels" / "step_000000.npy").is_file()


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_the_kl_of_the_current_model_is_logged_at_step_0_and_on_every_log_row(brighter):
    """kl, kl_se and the cumulative kl_net_evals on the rows of steps 0, 10, 20 and no others. At step 0
    θ = θ0, so every Girsanov increment is 0 up to the float32 rounding of two evaluations of the same
    network in different programs (measured 5e-11); then θ has moved: kl > 1e-3 with a positive SE.
    Each evaluation is 64 fresh paths through T = 2 steps (the passes counted in test_implicit_cost);
    the training's net_evals leave them out (test_a_changed_run_time_option_resumes)."""
    metrics = rows(brighter)
    logged = [r for r in metrics if "kl" in r]
    assert [r["step"] for r in logged] == [0, 10, 20]
    assert [r["step"] for r in metrics if "kl_se" in r or "kl_net_evals" in r] == [0, 10, 20]
    assert logged[0]["kl"] < 1e-6 and logged[0]["kl_se"] < 1e-6, logged[0]
    assert all(r["kl"] > 1e-3 and r["kl_se"] > 0 for r in logged[1:]), logged
    per_evaluation = girsanov.fresh_path_kl_passes(2, 64)
    assert [r["kl_net_evals"] for r in logged] == [per_evaluation * i for i in (1, 2, 3)]


def test_filled_defaults_follow_the_dataset_and_preset(tmp_path):
    """M, T, batch left to their rule: cpu 4/16/8; paper Tables 2 and 4 (MNIST 4/64/32, LSUN 2/64/16);
    a value given on the command line wins. The sampler of an idiff-pretrained model: euler-maruyama."""
    def fill(preset, dataset, **given):
        model = types.SimpleNamespace(cfg=types.SimpleNamespace(dataset=dataset), image_shape=(28, 28, 1))
        return finetune.complete(SCHEMA.resolve({"preset": preset, **given}), tmp_path, model)

    assert [(c.M, c.T, c.batch) for c in (fill("cpu", "mnist"), fill("paper", "mnist"), fill("paper", "lsun-bedroom"))] \
        == [(4, 16, 8), (4, 64, 32), (2, 64, 16)]
    assert (fill("paper", "mnist", T=8).T, fill("cpu", "mnist").from_run) == (8, str(tmp_path))
    assert (fill("cpu", "mnist").sampler, fill("cpu", "mnist", sampler="ddpm").sampler) == ("euler-maruyama", "ddpm")


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_evaluate_fid_and_sample_read_a_finetuned_run(brighter, tmp_path):
    """A finetune run directory loads as its base model with the finetuned θ (finetuned.json, weights/):
    evaluate-fid records checkpoint 20, and its samples differ from the base model's with the same keys."""
    run = tmp_path / "brighter"
    shutil.copytree(brighter, run)
    invoke("evaluate-fid", run, "--n", 4, "--batch", 4, "--sample-steps", 2, check=True)
    fid = json.loads((run / "fid.json").read_text())
    assert fid["checkpoint"] == 20 and fid["n"] == 4 and np.isfinite(fid["value"])
    config = json.loads((run / "config.json").read_text())
    invoke("sample", run, "--n", 4, "--sample-steps", 2, "--out", tmp_path / "finetuned", check=True)
    invoke("sample", config["from_run"], "--n", 4, "--sample-steps", 2, "--out", tmp_path / "base", check=True)
    images = [np.load(next((tmp_path / d).glob("*.npz")))["images"].astype(int) for d in ("finetuned", "base")]
    assert np.abs(images[0] - images[1]).max() > 0


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_rerun_into_a_finished_run_adds_no_steps(brighter, tiny_pretrain, tmp_path):
    run = tmp_path / "brighter"
    shutil.copytree(brighter, run)
    finetune_into(tiny_pretrain, run, *BRIGHTER)
    assert rows(run) == rows(brighter)


def resumable_copy(brighter, tmp_path):
    """The module's run as it was at its middle checkpoint (step 10): checkpoint 20 and θ of step 20 gone."""
    run = tmp_path / "brighter"
    shutil.copytree(brighter, run)
    shutil.rmtree(run / "checkpoints" / "20")
    shutil.rmtree(run / "weights" / "20")
    return run


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_resumed_from_the_middle_checkpoint_with_changed_run_time_options(brighter, tiny_pretrain, tmp_path):
    """The pipelined run stopped at checkpoint 10 (both queues, Adam state, θ), resumed with --log-every 5
    and --kl-n 8 (run-time options): restored through an abstract template, steps 11-20 repeat each outer
    step of the uninterrupted run exactly (same program, same inputs: every field but the clock and the
    KL's), the rows after step 10 that the copy held are replaced, not duplicated; the KL is now logged
    every 5 steps on 8 paths, and kl_net_evals goes on from step 10's count by an eighth of an evaluation
    of 64 paths."""
    run = resumable_copy(brighter, tmp_path)
    finetune_into(tiny_pretrain, run, *BRIGHTER, "--log-every", "5", "--kl-n", "8")
    kl_fields = ("kl", "kl_se", "kl_net_evals")
    resumed, whole = rows(run, drop=CLOCK), rows(brighter, drop=CLOCK)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(21))
    assert [{k: v for k, v in r.items() if k not in kl_fields} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in kl_fields} for r in whole]
    assert resumed[:11] == whole[:11]
    assert [r["step"] for r in resumed if "kl" in r] == [0, 10, 15, 20]
    per_evaluation = (whole[10]["kl_net_evals"] - whole[0]["kl_net_evals"]) // 8  # 8 paths against 64
    assert [resumed[s]["kl_net_evals"] for s in (10, 15, 20)] == \
        [whole[10]["kl_net_evals"] + i * per_evaluation for i in range(3)]
    config = json.loads((run / "config.json").read_text())
    assert (config["log_every"], config["kl_n"]) == (5, 8)


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_a_changed_defining_option_is_refused_in_one_line(brighter, tiny_pretrain, tmp_path):
    run = tmp_path / "brighter"
    shutil.copytree(brighter, run)
    result = invoke("finetune", "--from", tiny_pretrain, *TINY_FINETUNE, *BRIGHTER[2:], "--lambda", 5, "--out", run)
    assert "--lambda 10.0 -> 5.0" in error_line(result)
    assert rows(run) == rows(brighter)


@pytest.mark.slow  # shares the module's 20-step finetuning run and the session's split_finetune
def test_report_plots_the_logged_series(brighter, split_finetune, tmp_path, monkeypatch):
    """`idiff report A B --x net_evals`: per run, the training reward line is (net_evals, reward_mean)
    of metrics.jsonl, the dots are the fixed-key evaluations, the KL line the rows logging kl with
    error bars from kl − 2 kl_se to kl + 2 kl_se."""
    drawn = []
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.append((path.name, fig)) or save(fig, path))
    invoke("report", brighter, split_finetune, "--x", "net_evals", "--out", tmp_path, check=True)
    assert (tmp_path / "reward_kl_net_evals.png").is_file()
    fig = dict(drawn)["reward_kl_net_evals.png"]
    ax_reward, ax_kl = fig.axes
    for i, run in enumerate((brighter, split_finetune)):
        metrics = rows(run)
        line, dots = ax_reward.lines[2 * i: 2 * i + 2]
        series = lambda field: ([r["net_evals"] for r in metrics if field in r],  # noqa: E731
                                [r[field] for r in metrics if field in r])
        kl_line, _, (bars,) = ax_kl.containers[i]
        for drawn_line, field in ((line, "reward_mean"), (dots, "eval_reward"), (kl_line, "kl")):
            np.testing.assert_array_equal(drawn_line.get_xdata(), series(field)[0])
            np.testing.assert_array_equal(drawn_line.get_ydata(), series(field)[1])
        kl, se = np.array(series("kl")[1]), np.array(series("kl_se")[1])
        np.testing.assert_allclose([seg[:, 1] for seg in bars.get_segments()], np.stack([kl - 2 * se, kl + 2 * se], 1))


@pytest.mark.slow  # shares the module's 20-step finetuning run
def test_report_of_one_run_redraws_its_figures_and_refuses_an_x_it_does_not_log(brighter, tmp_path):
    run = tmp_path / "brighter"
    shutil.copytree(brighter, run)
    shutil.rmtree(run / "figures")
    invoke("report", run, check=True)
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["evolution.png", "report.md", "reward_kl.png"]
    assert "grad_evals" in error_line(invoke("report", run, "--x", "grad_evals"))


PLUGIN = """
import jax.numpy as jnp

def raises(x):
    raise RuntimeError("broken reward")

def wrong_shape(x):
    return jnp.mean(x, axis=(1, 2))

def by_prompt(x, prompts):
    return jnp.mean(x, axis=(1, 2, 3)) * (prompts.ids + 1)
"""


@pytest.mark.parametrize("args, message", [
    (["--reward", "red"], "error: reward 'red' needs images with >= 3 channels; this model makes 1-channel"),
    (["--reward", "ft_plugin:raises"], "error: reward 'ft_plugin:raises' fails on a batch of shape (2, 28, 28, 1): "
                                       "RuntimeError: broken reward"),
    (["--reward", "ft_plugin:wrong_shape"], "error: reward 'ft_plugin:wrong_shape' must map images [B, H, W, C] "
                                            "to [B] rewards; on a batch of shape (2, 28, 28, 1) it returned shape (2, 1)"),
    (["--reward", "ft_plugin:by_prompt"], "error: reward 'ft_plugin:by_prompt' takes prompts (reward(images, prompts)); "
                                          "this model is unconditional: its images have no prompts or class labels"),
    (["--reward", "sparkle"], "error: unknown image-reward 'sparkle'; valid choices: aesthetic, brightness, "
                              "clip-score, compressibility, digit:N, incompressibility, jpeg-compressibility, "
                              "jpeg-incompressibility, red, or package.module:function"),
    (["--reward", "aesthetic", "--reward-weights", "/nonexistent"],
     "error: reward 'aesthetic': aesthetic predictor head '/nonexistent/sac+logos+ava1-l14-linearMSE.pth' does not "
     "exist; download"),
    (["--reward-weights", "/nonexistent"], "error: --reward-weights: reward 'brightness' reads no weight files"),
    (["--ddim-eta", "1"], "error: --ddim-eta 1 applies to --sampler ddim, not euler-maruyama"),
    (["--reward", "compressibility"], "error: reward 'compressibility' is not differentiable: --method implicit "
                                      "needs ∇R; use --method ddpo"),
    (["--method", "ddpo", "--sampler", "probability-flow", "--beta", "0"],
     "error: --method ddpo needs a stochastic sampler (euler-maruyama, ddpm, or ddim with --ddim-eta > 0): "
     "--sampler probability-flow"),
    (["--method", "ddpo", "--adjoint", "pipelined"], "error: --method ddpo differentiates log-probabilities"),
    (["--method", "ddpo", "--clip-range", "0"], "error: --clip-range must be > 0"),
    (["--method", "ddpo", "--inner-epochs", "0"], "error: --inner-epochs must be > 0"),
    (["--method", "nested", "--inner-epochs", "2", "--advantage", "raw"],
     "error: --advantage, --inner-epochs: --method ddpo's option(s); --method nested does not use them"),
    (["--method", "nested", "--train-batch", "4", "--adv-clip", "2"],
     "error: --train-batch, --adv-clip: --method ddpo's option(s); --method nested does not use them"),
    (["--method", "ddpo", "--train-batch", "3"],
     "error: --train-batch (3) must divide --batch (8): each pass over a round cuts its paths into minibatches"),
    (["--method", "ddpo", "--advantage", "raw", "--adv-clip", "2"],
     "error: --adv-clip bounds the normalized advantages; --advantage raw keeps λ R unclipped"),
    (["--M", "3", "--T", "8"], "error: --M (3) must divide --T (8)"),
    (["--method", "sideways"], "error: unknown finetune-method 'sideways'; valid choices:"),
    (["--method", "nested", "--adjoint", "pipelined"], "error: --adjoint pipelined is a queue of adjoint states"),
    (["--sampler", "probability-flow"], "error: --sampler probability-flow is deterministic"),
    (["--adjoint", "continuous"], "error: --adjoint continuous is the adjoint ODE of the probability flow"),
    (["--adjoint", "continuous", "--sampler", "probability-flow"], "error: --sampler probability-flow is deterministic"),
    (["--method", "truncated-20"], "error: --method truncated-20: truncated-K needs 1 <= K <= --T (16)"),
    (["--sample-every", "15"], "error: --sample-every (15) must be a multiple of --log-every (10)"),
    (["--from", "/nonexistent"], "error: '/nonexistent' holds no trained model"),
    (["--kl-n", "12"], "error: --kl-n (12) must be a multiple of --batch (8)"),
    (["--final-step", "last"], "error: unknown --final-step 'last'; valid choices: tweedie, none, noisy"),
    (["--final-step", "noisy"], "error: --final-step noisy makes the last ancestral step of a discrete DDPM chain "
                                "draw noise (--sampler ddpm on an imported model); this run samples with "
                                "euler-maruyama on a continuous-time process: use --final-step none"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(tiny_pretrain, tmp_path, monkeypatch, args, message):
    (tmp_path / "ft_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert error_line(invoke("finetune", "--from", tiny_pretrain, *args, "--out", tmp_path / "run")).startswith(message)
    assert not (tmp_path / "run").exists()




@pytest.fixture(scope="module")
def ddpo_run(tiny_pretrain, tmp_path_factory):
    return finetune_into(tiny_pretrain, tmp_path_factory.mktemp("ddpo") / "digit", *DDPO)


@pytest.mark.slow  # a 4-step ddpo run, shared with the resume test
def test_ddpo_with_the_classifier_reward_writes_the_usual_outputs_and_counts_its_rounds(ddpo_run):
    """--method ddpo --reward digit:7 (the log-probability of class 7 under the MNIST classifier; ddpo
    with a reward that has no gradient, JPEG compressibility, runs on the SD fixture in test_sd_cli.py)
    through the CLI: the rows, KL, grids, checkpoints and weights of every method, and ddpo's clipfrac and
    approx_kl. Every step samples a round (its own rewarded images: log-probabilities < 0) and makes
    E·K = 2·2 updates on it. Declared passes at T = 2, batch 4, β > 0, Tweedie d = 1: the round T + d forward
    and T more for θ_old's means, each pass over it 2T forward (θ's and θ0's) and T backward, so
    net_evals = 4 · (2T + d + E·2T + E·T) s = 68 s, and sequential_calls = (2T + d + E·K·T) s = 13 s."""
    metrics = rows(ddpo_run)
    train = [r for r in metrics if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    rewards = [(r["reward_mean"], r["reward_std"]) for r in train]
    assert len(set(rewards)) == 4 and max(mean for mean, _ in rewards) < 0, rewards
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in train)
    assert all(0 <= r["clipfrac"] <= 1 and r["approx_kl"] > 0 for r in train), train
    assert [r["net_evals"] for r in metrics] == [68 * s for s in range(5)]
    assert [r["sequential_calls"] for r in metrics] == [13 * s for s in range(5)]
    assert [r["step"] for r in metrics if "kl" in r] == [0, 1, 2, 3, 4]
    config = json.loads((ddpo_run / "config.json").read_text())
    assert (config["method"], config["reward"], config["inner_epochs"], config["train_batch"], config["clip_range"],
            config["adv_clip"], config["advantage"]) == ("ddpo", "digit:7", 2, 2, 1e-4, 5.0, "normalized")
    assert sorted(p.name for p in (ddpo_run / "samples").glob("*.png")) == ["step_000000.png", "step_000004.png"]
    assert {p.name for p in (ddpo_run / "figures").iterdir()} >= {"reward_kl.png", "evolution.png"}
    assert (ddpo_run / "checkpoints" / "4").is_dir() and (ddpo_run / "weights" / "4").is_dir()


@pytest.mark.slow  # shares the 4-step ddpo run
def test_ddpo_resumed_mid_run_logs_the_uninterrupted_rows(ddpo_run, tiny_pretrain, tmp_path):
    """Checkpoint 2 holds θ, Adam's state and the carry (2 rounds sampled, the root key): resumed there,
    steps 3 and 4 sample slots 2 and 3 and update on them exactly as the uninterrupted run (its rows,
    clipfrac and approx_kl included)."""
    run = tmp_path / "ddpo"
    shutil.copytree(ddpo_run, run)
    shutil.rmtree(run / "checkpoints" / "4")
    shutil.rmtree(run / "weights" / "4")
    finetune_into(tiny_pretrain, run, *DDPO)
    assert rows(run, drop=CLOCK) == rows(ddpo_run, drop=CLOCK)


@pytest.mark.slow  # compiles an outer step
def test_lora_on_the_pixel_u_net(tiny_pretrain):
    """`--lora-rank 2` on idiff's own U-Net: adapters on every dense and convolution layer of its residual and
    attention blocks (none elsewhere), θ0's merged network the pretrained one exactly (B = 0), a nonzero
    gradient of the first outer step for B alone (A's gradient is B-weighted: zero while B = 0), and a
    LoRA spec recorded for `load`."""
    model = load(tiny_pretrain)
    cfg = finetune.complete(SCHEMA.resolve(dict(T=2, M=2, batch=4, lora_rank=2, method="nested", clip=False)),
                            tiny_pretrain, model)
    subject = subject_of(cfg, model)
    names = lora.module_names(model.params)
    assert cfg.train == "lora" and subject.lora.targets == tuple(
        n for n in names if n.split(".")[0].startswith(("ResBlock", "AttnBlock")))
    assert "Conv_0" in names and "Conv_0" not in subject.lora.targets
    merged = lora.merge(model.params, subject.theta0, subject.lora.scale)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    parts = finetune.build(cfg, model, subject)

    @jax.jit
    def gradient(frozen, key):
        _, method = parts.bind(frozen)
        theta = subject.reference(frozen["subject"])
        return method.estimate(theta, method.init(theta, key), None)[1].grad

    grad = gradient(parts.frozen, jax.random.key(0))
    ups = [a["up"] for _, a in lora._adapted(grad)]
    downs = [a["down"] for _, a in lora._adapted(grad)]
    assert sum(float(jnp.sum(u ** 2)) for u in ups) > 0 and all(not np.any(np.asarray(d)) for d in downs)
