"""Figures of finetuning runs, drawn from their run directories alone (by `idiff finetune` at the end
of a run and by `idiff report`): reward and KL against outer steps, network evaluations, sequential
calls or wall time (paper Figs 6, 15, 17), the same-seed sample-evolution strip (Figs 7, 13, 14, 16),
and, over runs with different λ/β (a sweep), the trade-off: the reward gained against the final KL and
against the final `label_kept`, one point per λ/β.

The KL panel is the logged `kl` ± 2 `kl_se`: the Girsanov KL between the sampler's path measures under
θ_k and θ0, up to x_{t_min} (the final Tweedie step has no Girsanov term), estimated on fresh paths of
θ_k from fixed keys.
"""

from __future__ import annotations

import io
import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.images import save_strip  # noqa: E402
from idiff_cli import storage  # noqa: E402
from idiff_cli.runs import RunDir, read_json, save_figure  # noqa: E402

X_AXES = {"step": "outer step", "net_evals": "network evaluations (images)", "wall_s": "wall time (s)",
          "sequential_calls": "sequential batched network calls"}
EVOLUTION_ROWS = 8  # images per row of the evolution strip


def plot_reward_kl(run_dirs: Sequence[pathlib.Path], labels: Sequence[str], x: str = "step"):
    """The figure: left, per run, the training-batch reward (line, ± std band) and the fixed-key
    evaluation reward (dots); right, the Girsanov path KL of θ_k to θ0 with error bars of 2 standard
    errors (one ErrorbarContainer per run), each against `x`. Returns the figure."""
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        rows = RunDir(run_dir).read_metrics()
        train = [r for r in rows if "reward_mean" in r]
        xs = np.array([r[x] for r in train])
        mean = np.array([r["reward_mean"] for r in train])
        std = np.array([r["reward_std"] for r in train])
        line, = ax_r.plot(xs, mean, label=label, lw=1)
        ax_r.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ev = [r for r in rows if "eval_reward" in r]
        ax_r.plot([r[x] for r in ev], [r["eval_reward"] for r in ev], "o", color=line.get_color(), ms=4)
        kl = [r for r in rows if "kl" in r]
        ax_kl.errorbar([r[x] for r in kl], [r["kl"] for r in kl], yerr=[2 * r["kl_se"] for r in kl], fmt="-o",
                       ms=3, capsize=2, color=line.get_color(), label=label)
    ax_r.set(xlabel=X_AXES[x], ylabel="reward", title="reward (line: training batch ± std; dots: fixed keys)")
    ax_kl.set(xlabel=X_AXES[x], ylabel=r"KL(P_θ ‖ P_θ0) of the paths up to $x_{t_{\min}}$",
              title="Girsanov KL of the sampler's paths to θ0 (fresh paths of θ_k, ± 2 SE);\n"
                    "the final Tweedie step has no Girsanov term and is not included")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    return fig


def evolution_strip(run_dir: pathlib.Path, target: pathlib.Path) -> pathlib.Path | None:
    """`target`: one row per saved step (top: θ0) of the first fixed-key samples, read from
    samples/step_*.npy; None when the run saved none."""
    files = sorted((storage.path(run_dir) / "samples").glob("step_*.npy"))
    if not files:
        return None
    return save_strip([np.load(io.BytesIO(path.read_bytes()))[:EVOLUTION_ROWS] for path in files], target)


def lambda_over_beta(run_dir: pathlib.Path) -> float:
    """λ/β of a run (±inf for β = 0)."""
    cfg = read_json(storage.path(run_dir) / "config.json", ("lam", "beta"))
    return cfg["lam"] / cfg["beta"] if cfg["beta"] else float(np.copysign(np.inf, cfg["lam"]))


def last(rows: list[dict], key: str) -> float | None:
    """The value of `key` on the last row that logs it (None when none does)."""
    return next((r[key] for r in reversed(rows) if key in r), None)


def tradeoff(run_dirs: Sequence[pathlib.Path]):
    """One point per run at its λ/β: the fixed-key reward gained (last eval_reward minus the step-0
    one) against the last logged KL (± 2 SE) and, where logged, against the last label_kept. Returns
    the figure."""
    points = []
    for run_dir in run_dirs:
        rows = RunDir(run_dir).read_metrics()
        evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
        points.append((lambda_over_beta(run_dir), evals[-1] - evals[0], last(rows, "kl"), last(rows, "kl_se"),
                       last(rows, "label_kept")))
    points.sort(key=lambda p: p[0])
    panels = [("kl", r"KL(P_θ ‖ P_θ0) of the paths, last logged (± 2 SE)")]
    if any(p[4] is not None for p in points):
        panels.append(("label_kept", "label_kept: fraction of fixed-key samples keeping their step-0 digit"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (metric, xlabel) in zip(axes[0], panels):
        for i, (ratio, gain, kl, kl_se, kept) in enumerate(points):
            x = kl if metric == "kl" else kept
            if x is None:
                continue
            ax.errorbar(x, gain, xerr=2 * kl_se if metric == "kl" and kl_se is not None else None, fmt="o",
                        color=f"C{i}", capsize=2, label=f"λ/β = {ratio:g}")
            ax.annotate(f"{ratio:g}", (x, gain), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0, color="0.7", lw=0.6)
        ax.set(xlabel=xlabel, ylabel="reward gain (fixed keys, last − step 0)")
    axes[0, 0].set_title("reward against KL, one point per λ/β", fontsize=10)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def finish_run(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """The figures of one run, into run_dir/figures/."""
    return report([run_dir], storage.path(run_dir) / "figures", "step")


def _label(run_dir: pathlib.Path) -> str:
    path = run_dir / "config.json"
    cfg = read_json(path) if path.exists() else {}
    return (f"{run_dir.name}: {cfg.get('method', '?')} λ={cfg.get('lam', '?')} β={cfg.get('beta', '?')} "
            f"lr={cfg.get('lr', '?')}")


def report(run_dirs: Sequence[pathlib.Path], out: pathlib.Path, x: str = "step") -> list[pathlib.Path]:
    """One run: its reward_kl.png (x = step) or reward_kl_<x>.png and evolution.png into `out`; several:
    their curves overlaid in `out`/reward_kl_<x>.png, and `out`/tradeoff.png when their λ/β differ.
    Returns the files written."""
    run_dirs = [storage.path(r) for r in run_dirs]
    if x not in X_AXES:
        raise UserError(f"finetune runs have no x axis '{x}'; valid: {', '.join(X_AXES)}")
    for run_dir in run_dirs:
        rows = RunDir(run_dir).read_metrics()
        train = [r for r in rows if "reward_mean" in r]
        if not train:
            raise UserError(f"'{run_dir}' has no finetuning steps logged in metrics.jsonl yet")
        if any(x not in r for r in rows):
            raise UserError(f"'{run_dir}' does not log {x} on every row of metrics.jsonl")
    out = storage.path(out)
    name = "reward_kl.png" if x == "step" and len(run_dirs) == 1 else f"reward_kl_{x}.png"
    written = [save_figure(plot_reward_kl(run_dirs, [_label(r) for r in run_dirs], x), out / name)]
    if len({lambda_over_beta(r) for r in run_dirs}) > 1:
        written.append(save_figure(tradeoff(run_dirs), out / "tradeoff.png"))
    if len(run_dirs) == 1:
        strip = evolution_strip(run_dirs[0], out / "evolution.png")
        written += [strip] if strip else []
    return written
