"""Figures of finetuning runs, drawn from their run directories alone (by `idiff finetune` at the end
of a run and by `idiff report`): reward and KL against outer steps, network evaluations, sequential
calls or wall time (paper Figs 6, 15, 17), and the same-seed sample-evolution strip (Figs 7, 13, 14, 16).

The KL panel is the logged `kl` ± 2 `kl_se`: the Girsanov KL between the sampler's path measures under
θ_k and θ0, up to x_{t_min} (the final Tweedie step has no Girsanov term), estimated on fresh paths of
θ_k from fixed keys.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.images import save_strip  # noqa: E402
from idiff_cli.runs import read_metrics, save_figure  # noqa: E402

X_AXES = {"step": "outer step", "net_evals": "network evaluations (images)", "wall_s": "wall time (s)",
          "sequential_calls": "sequential batched network calls"}
EVOLUTION_ROWS = 8  # images per row of the evolution strip


def plot_reward_kl(run_dirs: Sequence[pathlib.Path], labels: Sequence[str], x: str = "step"):
    """The figure: left, per run, the training-batch reward (line, ± std band) and the fixed-key
    evaluation reward (dots); right, the Girsanov path KL of θ_k to θ0 with error bars of 2 standard
    errors (one ErrorbarContainer per run), each against `x`. Returns the figure."""
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        rows = read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")
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
    files = sorted((pathlib.Path(run_dir) / "samples").glob("step_*.npy"))
    if not files:
        return None
    return save_strip([np.load(path)[:EVOLUTION_ROWS] for path in files], target)


def finish_run(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """The figures of one run, into run_dir/figures/."""
    return report([run_dir], pathlib.Path(run_dir) / "figures", "step")


def _label(run_dir: pathlib.Path) -> str:
    path = run_dir / "config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    return (f"{run_dir.name}: {cfg.get('method', '?')} λ={cfg.get('lam', '?')} β={cfg.get('beta', '?')} "
            f"lr={cfg.get('lr', '?')}")


def report(run_dirs: Sequence[pathlib.Path], out: pathlib.Path, x: str = "step") -> list[pathlib.Path]:
    """One run: its reward_kl.png (x = step) or reward_kl_<x>.png and evolution.png into `out`; several:
    their curves overlaid in `out`/reward_kl_<x>.png. Returns the files written."""
    run_dirs = [pathlib.Path(r) for r in run_dirs]
    if x not in X_AXES:
        raise UserError(f"finetune runs have no x axis '{x}'; valid: {', '.join(X_AXES)}")
    for run_dir in run_dirs:
        rows = read_metrics(run_dir / "metrics.jsonl")
        train = [r for r in rows if "reward_mean" in r]
        if not train:
            raise UserError(f"'{run_dir}' has no finetuning steps logged in metrics.jsonl yet")
        if any(x not in r for r in rows):
            raise UserError(f"'{run_dir}' does not log {x} on every row of metrics.jsonl")
    out = pathlib.Path(out)
    name = "reward_kl.png" if x == "step" and len(run_dirs) == 1 else f"reward_kl_{x}.png"
    written = [save_figure(plot_reward_kl(run_dirs, [_label(r) for r in run_dirs], x), out / name)]
    if len(run_dirs) == 1:
        strip = evolution_strip(run_dirs[0], out / "evolution.png")
        written += [strip] if strip else []
    return written
