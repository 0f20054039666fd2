"""Figures of pretrain runs, drawn from metrics.jsonl alone: the loss curves (and the periodic FID).

    loss_figure([(label, rows), ...], x="step")   # denoising loss and gradient norm, one line per run
    fid_figure([(label, rows), ...], x="step")    # the FID logged by --fid-every, or None
    report(run_dirs, out, x)                      # `idiff report` for pretrain runs
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.runs import RunDir, atomic_path  # noqa: E402

X_AXES = {"step": "training step", "wall_s": "wall-clock seconds"}
Series = Sequence[tuple[str, list[dict[str, Any]]]]  # (label, metrics rows) per run


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise UserError(f"pretrain runs log --x {', '.join(X_AXES)}, not '{x}'")


def loss_figure(runs: Series, x: str = "step"):
    """Left: the denoising loss (mean over each log window); right: the gradient norm; one line per run."""
    _check_x(x)
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, rows in runs:
        xs = [r[x] for r in rows if "loss" in r]
        ax_loss.plot(xs, [r["loss"] for r in rows if "loss" in r], lw=1, label=label)
        ax_grad.plot(xs, [r["grad_norm"] for r in rows if "loss" in r], lw=1, label=label)
    ax_loss.set(xlabel=X_AXES[x], ylabel="denoising loss (mean over log window)", yscale="log",
                title="denoising score matching")
    ax_grad.set(xlabel=X_AXES[x], ylabel="gradient norm", yscale="log", title="gradient norm")
    if len(runs) > 1:
        ax_loss.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fid_figure(runs: Series, x: str = "step"):
    """The periodic FID (`--fid-every`) against `x`, one line per run; None when no run logged one."""
    _check_x(x)
    logged = [(label, [r for r in rows if "fid" in r]) for label, rows in runs]
    if not any(rows for _, rows in logged):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, rows in logged:
        ax.plot([r[x] for r in rows], [r["fid"] for r in rows], "o-", lw=1, label=label)
    ax.set(xlabel=X_AXES[x], ylabel="FID (EMA weights, fixed keys)", title="FID during training")
    if len(runs) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_loss(run_dir: RunDir) -> pathlib.Path | None:
    """figures/loss.png of one run (nothing before its first logged row)."""
    rows = run_dir.read_metrics()
    if not rows:
        return None
    return run_dir.save_figure(loss_figure([(run_dir.path.name, rows)]), "loss.png")


def report(run_dirs: Sequence[pathlib.Path], out: pathlib.Path, x: str = "step") -> list[pathlib.Path]:
    """One run: its loss.png (and fid.png when it logged the FID) in `out`; several: their curves
    overlaid, `out`/loss_<x>.png (and fid_<x>.png). Returns the files written."""
    _check_x(x)
    runs = []
    for run_dir in run_dirs:
        rows = RunDir(run_dir).read_metrics()
        if not rows:
            raise UserError(f"'{run_dir}' has no logged steps yet (empty metrics.jsonl)")
        runs.append((pathlib.Path(run_dir).name, rows))
    suffix = "" if len(runs) == 1 else f"_{x}"
    target = RunDir(out)
    written = [_save(target, loss_figure(runs, x), f"loss{suffix}.png")]
    fid = fid_figure(runs, x)
    if fid is not None:
        written.append(_save(target, fid, f"fid{suffix}.png"))
    return written


def _save(target: RunDir, fig, name: str) -> pathlib.Path:
    """`fig` as `target`/name (PNG), closed."""
    path = target.path / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
