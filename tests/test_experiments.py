"""experiments/: every script parses and dry-runs (prints `idiff` commands, runs and writes nothing);
the Langevin and EBM scripts run at SMOKE sizes; the finetune sweep writes one run directory per value
and skips finished runs when re-run; `idiff report` writes report.md with the runs' final metrics and
the λ/β trade-off figure; finetune's label_kept hook."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest
from helpers import invoke, rows
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = sorted(p for p in EXPERIMENTS.glob("*.sh") if p.name != "lib.sh")

# A stand-in `idiff` for the script tests: logs its arguments; `finetune ... --steps N --out DIR` leaves
# DIR as a finished finetune run (finetuned.json final at step N) unless FAKE_UNFINISHED is set.
FAKE_IDIFF = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "$1" = finetune ]; then
  args=("$@")
  for i in "${!args[@]}"; do
    case "${args[$i]}" in --out) out=${args[$((i + 1))]} ;; --steps) steps=${args[$((i + 1))]} ;; esac
  done
  mkdir -p "$out"
  final=true; [ -n "${FAKE_UNFINISHED:-}" ] && final=false
  echo "{\"step\": $steps, \"final\": $final}" > "$out/finetuned.json"
fi
"""


def fake_path(tmp_path: pathlib.Path) -> dict:
    """An environment whose PATH starts with the stand-in `idiff`, logging to tmp_path/idiff.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "idiff"
    fake.write_text(FAKE_IDIFF)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "SMOKE", "OUT", "PRE", "STEPS")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_LOG": str(tmp_path / "idiff.log")}


def bash(script: pathlib.Path, cwd: pathlib.Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("script", [*SCRIPTS, EXPERIMENTS / "lib.sh"], ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("smoke", ["0", "1"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_commands_and_runs_nothing(script, smoke, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**fake_path(tmp_path), "DRY_RUN": "1", "SMOKE": smoke}
    env.pop("IDIFF_INCEPTION_WEIGHTS", None)
    result = bash(script, work, env, "--seed", "7")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("idiff ") for line in lines), result.stdout
    assert any("--seed 7" in line for line in lines)  # extra arguments reach the runs
    assert not (tmp_path / "idiff.log").exists(), "DRY_RUN=1 called idiff"
    assert list(work.iterdir()) == [], "DRY_RUN=1 wrote files"


def test_smoke_sizes_differ_from_full(tmp_path):
    env = {**fake_path(tmp_path), "DRY_RUN": "1"}
    full = bash(EXPERIMENTS / "langevin_reward.sh", tmp_path, env).stdout
    smoke = bash(EXPERIMENTS / "langevin_reward.sh", tmp_path, {**env, "SMOKE": "1"}).stdout
    assert "--steps 5000" in full and "--seeds 10" in full
    assert "--steps 40" in smoke and "--seeds 2" in smoke


def finetune_outs(log: pathlib.Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [re.search(r"--out (\S+)", line).group(1) for line in lines if line.startswith("finetune ")]


def test_sweep_one_directory_per_value_then_skips_finished(tmp_path):
    """finetune_mnist.sh under SMOKE: λ/β = −30, +30 and lr 3e-4, each its own directory under one parent,
    then a report of each sweep; the second invocation skips the finished runs (no finetune call) and
    reports again; an unfinished run is run again (resumed)."""
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "pretrained.json").write_text("{}")
    out = tmp_path / "sweep"
    env = {**fake_path(tmp_path), "SMOKE": "1", "PRE": str(pre), "OUT": str(out)}
    log = tmp_path / "idiff.log"

    first = bash(EXPERIMENTS / "finetune_mnist.sh", tmp_path, env)
    assert first.returncode == 0, first.stderr
    expected = [str(out / "lambda-over-beta" / "lb-30"), str(out / "lambda-over-beta" / "lb+30"), str(out / "lr" / "lr3e-4")]
    assert finetune_outs(log) == expected
    assert sorted(p.name for p in (out / "lambda-over-beta").iterdir()) == ["lb+30", "lb-30"]
    lines = log.read_text().splitlines()
    assert "--lambda -3 " in lines[0] and "--lambda 3 " in lines[1]
    assert sum(line.startswith("report ") for line in lines) == 2

    log.unlink()
    second = bash(EXPERIMENTS / "finetune_mnist.sh", tmp_path, env)
    assert second.returncode == 0, second.stderr
    assert finetune_outs(log) == []
    assert second.stderr.count("skip ") == 3
    assert sum(line.startswith("report ") for line in log.read_text().splitlines()) == 2

    # an interrupted run (final false) and a finished run asked for more steps are run again
    (out / "lr" / "lr3e-4" / "finetuned.json").write_text(json.dumps({"step": 1, "final": False}))
    log.unlink()
    third = bash(EXPERIMENTS / "finetune_mnist.sh", tmp_path, {**env, "STEPS": "2"})
    assert finetune_outs(log) == [str(out / "lr" / "lr3e-4")], third.stderr
    log.unlink()
    fourth = bash(EXPERIMENTS / "finetune_mnist.sh", tmp_path, {**env, "STEPS": "4"})
    assert finetune_outs(log) == expected, fourth.stderr


def test_sweep_lambda_values(tmp_path):
    """The full λ/β sweep at β = 0.1: λ = λ/β · β for ±10, ±30, ±100."""
    env = {**fake_path(tmp_path), "DRY_RUN": "1", "OUT": "S"}
    lines = bash(EXPERIMENTS / "finetune_mnist.sh", tmp_path, env).stdout.splitlines()
    pairs = [(re.search(r"--lambda (\S+)", line).group(1), re.search(r"--out (\S+)", line).group(1))
             for line in lines if line.startswith("idiff finetune") and "--lr 1e-4" in line]
    assert pairs == [("-10", "S/lambda-over-beta/lb-100"), ("-3", "S/lambda-over-beta/lb-30"),
                     ("-1", "S/lambda-over-beta/lb-10"), ("1", "S/lambda-over-beta/lb+10"),
                     ("3", "S/lambda-over-beta/lb+30"), ("10", "S/lambda-over-beta/lb+100")]


# ---------------------------------------------------------------- report.md


def table_of(report: pathlib.Path) -> list[dict[str, str]]:
    lines = [line for line in report.read_text().splitlines() if line.startswith("|")]
    keys = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(keys, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def expected_final(rows: list[dict], method: str | None, key: str) -> float:
    """The value of `key` on the last row (of `method`) that logs it."""
    return [r[key] for r in rows if (method is None or r.get("method") == method) and key in r][-1]


def check_cell(cell: str, rows: list[dict], method: str | None, key: str) -> None:
    """A cell is `mean (min..max)` of key_mean/_min/_max, or the number of `key`, to 5 significant digits."""
    seeds = re.fullmatch(r"(\S+) \((\S+)\.\.(\S+)\)", cell)
    if seeds:
        for value, stat in zip(seeds.groups(), ("mean", "min", "max")):
            assert float(value) == pytest.approx(expected_final(rows, method, f"{key}_{stat}"), rel=1e-4), key
    else:
        assert float(cell) == pytest.approx(expected_final(rows, method, key), rel=1e-4), key


def write_finetune_run(path: pathlib.Path, lam: float, beta: float, gain: float, kl: float, kept: float | None):
    """A finetune run directory with 3 logged steps whose last eval_reward is step 0's + gain."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"command": "finetune", "lam": lam, "beta": beta, "lr": 1e-4,
                                                  "method": "implicit"}))
    rows = [{"step": 0, "eval_reward": -0.6, "kl": 0.0, "kl_se": 0.0, "net_evals": 0, "sequential_calls": 0,
             "wall_s": 1.0, **({"label_kept": 1.0} if kept is not None else {})}]
    for step in (1, 2, 3):
        rows.append({"step": step, "reward_mean": -0.6 + gain * step / 3, "reward_std": 0.1, "grad_norm": 2.0 + step,
                     "net_evals": 10 * step, "sequential_calls": step, "wall_s": 1.0 + step})
    rows[-1].update({"eval_reward": -0.6 + gain, "kl": kl, "kl_se": kl / 10,
                     **({"label_kept": kept} if kept is not None else {})})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_report_md_of_a_sweep(tmp_path):
    runs = {lb: write_finetune_run(tmp_path / f"lb{lb:+d}", lb * 0.1, 0.1, 0.01 * lb, 0.002 * abs(lb), 1 - abs(lb) / 200)
            for lb in (-30, 10, 30)}
    out = tmp_path / "report"
    invoke("report", *[tmp_path / f"lb{lb:+d}" for lb in runs], "--out", out, check=True)
    # the trade-off figure of the three runs: two panels (KL and label_kept), a point of its colour per run
    tradeoff = np.asarray(Image.open(out / "tradeoff.png").convert("RGB"))
    assert tradeoff.shape[1] > 2 * tradeoff.shape[0], tradeoff.shape
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):  # matplotlib's C0, C1, C2
        assert np.all(tradeoff == colour, axis=-1).any(), colour
    table = table_of(out / "report.md")
    assert [row["run"] for row in table] == [str(tmp_path / f"lb{lb:+d}") for lb in runs]
    for row, (lb, logged) in zip(table, runs.items()):
        assert float(row["lam"]) == pytest.approx(lb * 0.1)  # the option that differs is a column
        assert "beta" not in row  # the same in every run
        for key in ("eval_reward", "kl", "label_kept", "reward_mean", "grad_norm", "net_evals", "step"):
            check_cell(row[key], logged, None, key)
    text = (out / "report.md").read_text()
    assert "(tradeoff.png)" in text and "(reward_kl_step.png)" in text


def test_tradeoff_points(tmp_path):
    """One point per λ/β at (final KL, reward gain) and (final label_kept, reward gain), sorted by λ/β."""
    import matplotlib.pyplot as plt

    from idiff_cli.implicit.report import tradeoff

    dirs = []
    for lb, gain, kl, kept in ((30, 0.2, 0.5, 0.7), (-10, -0.05, 0.1, 0.95)):
        write_finetune_run(tmp_path / f"r{lb}", lb * 0.1, 0.1, gain, kl, kept)
        dirs.append(tmp_path / f"r{lb}")
    fig = tradeoff(dirs)
    ax_kl, ax_kept = fig.axes
    kl_points = [line.get_xydata()[0].tolist() for line in ax_kl.lines if line.get_marker() == "o"]
    kept_points = [line.get_xydata()[0].tolist() for line in ax_kept.lines if line.get_marker() == "o"]
    plt.close(fig)
    np.testing.assert_allclose(kl_points, [[0.1, -0.05], [0.5, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(kept_points, [[0.95, -0.05], [0.7, 0.2]], rtol=1e-6)


# ---------------------------------------------------------------- Langevin and EBM scripts at SMOKE sizes


def documented_figures(script: pathlib.Path) -> list[str]:
    """The files a script's header lists under `Figures in $OUT/figures/:`."""
    header = script.read_text().split("# Figures in $OUT/figures/:")[1].split("# Hardware:")[0]
    return sorted(re.findall(r"\w+\.(?:png|md)", header))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["langevin_reward.sh", "ebm_train.sh"])
def test_smoke_run(script, tmp_path):
    """The script at SMOKE sizes writes the figures its header lists, and report.md's table holds the
    final metrics of every method."""
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "PRE", "STEPS")}
    out = tmp_path / "run"
    result = bash(EXPERIMENTS / script, tmp_path, {**env, "SMOKE": "1", "OUT": str(out)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "figures").iterdir()) == documented_figures(EXPERIMENTS / script)
    logged = rows(out)
    table = table_of(out / "figures" / "report.md")
    assert {row["method"] for row in table} == {r["method"] for r in logged}
    for row in table:
        for key in ("step", "grad_evals", "loglik"):
            check_cell(row[key], logged, row["method"], key)
    assert re.fullmatch(r"\S+ \(\S+\.\.\S+\)", table[0]["loglik"])  # mean (min..max) over the seeds


# ---------------------------------------------------------------- label_kept


@pytest.fixture(scope="module")
def digits():
    from idiff_cli.data.embedded import mnist_digits

    images, labels = mnist_digits()
    return images.astype(np.float32) / 127.5 - 1.0, labels  # [-1, 1], as samples are


@pytest.fixture(scope="module")
def labeller():
    from idiff_cli.implicit.labels import make_labeller

    return make_labeller()


class State:
    def __init__(self, params):
        self.params = params


def test_label_classifier_is_not_the_fid_one(labeller, digits):
    from idiff_cli import classifiers

    _, meta = classifiers.load_or_train(spec=classifiers.LABELS)
    # 100 training digits per class: 0.909 held out (4,000 digits: standard error 0.005)
    assert meta["held_out_accuracy"] > 0.89
    assert classifiers.LABELS.seed != classifiers.FID.seed
    assert classifiers.FID.train[1] <= classifiers.LABELS.train[0]  # disjoint training digits
    images, labels = digits
    held_out = np.arange(len(images)) % 500 < 400  # LABELS trains on positions 400..499
    assert np.mean(labeller(images[held_out]) == labels[held_out]) > 0.89


def test_label_kept(labeller, digits, tmp_path):
    """θ are indices into the embedded digits (sample(θ) = those digits): θ = θ0 keeps every label;
    half of them swapped for digits of the next class keeps about half; θ0's labels are read back
    from the run directory (a resumed run compares with the same reference)."""
    from idiff_cli.implicit.labels import REFERENCE, label_kept_hook

    images, labels = digits
    rng = np.random.default_rng(0)
    theta0 = rng.choice(len(images), 256, replace=False)
    sample = lambda idx: images[idx]  # noqa: E731
    hook = label_kept_hook(sample, theta0, 10, tmp_path, labeller)
    assert hook.fn(State(theta0), 10) == {"label_kept": 1.0}
    assert (tmp_path / REFERENCE).exists()

    swapped = theta0.copy()
    for i in range(128):  # another digit of the next class in the first half
        swapped[i] = rng.choice(np.flatnonzero(labels == (labels[theta0[i]] + 1) % 10))
    kept = hook.fn(State(swapped), 20)["label_kept"]
    assert 0.42 <= kept <= 0.56, kept

    brighter = label_kept_hook(lambda idx: np.clip(images[idx] * 1.2 + 0.2, -1, 1), theta0, 10, tmp_path / "b",
                               labeller)
    assert brighter.fn(State(theta0), 10)["label_kept"] == 1.0

    # a new hook on the same run directory (a resumed run) keeps θ0's stored labels, whatever params0 it gets
    resumed = label_kept_hook(sample, swapped, 10, tmp_path, labeller)
    assert resumed.fn(State(swapped), 30)["label_kept"] == kept
    assert resumed.fn(State(theta0), 30)["label_kept"] == 1.0


def test_label_kept_style_change_keeps_labels(labeller, digits, tmp_path):
    """θ = (digit indices, an image transform): thicker, brighter digits (a 3×3 max filter, the change of
    style of the paper's Fig. 14) mostly keep their label; digits rolled by half the image do not."""
    from idiff_cli.implicit.labels import label_kept_hook

    images, _ = digits

    def thicker(x):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1)
        return np.max([padded[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)], axis=0)

    transforms = {"none": lambda x: x, "thicker": thicker, "rolled": lambda x: np.roll(x, 14, axis=2)}
    sample = lambda theta: transforms[theta[1]](images[theta[0]])  # noqa: E731
    theta0 = (np.arange(0, 5000, 19)[:256], "none")
    kept = {name: label_kept_hook(sample, theta0, 1, tmp_path / name, labeller).fn(State((theta0[0], name)), 1)
            for name in transforms}
    assert kept["none"]["label_kept"] == 1.0
    assert kept["thicker"]["label_kept"] >= 0.8
    assert kept["rolled"]["label_kept"] < 0.5
