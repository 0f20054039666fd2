"""Figures of finetuning runs, drawn from their run directories alone (used by `idiff finetune` and
`idiff report`): reward and KL against outer steps or network evaluations (paper Figs 6, 15, 17) and
the same-seed sample-evolution strip (Figs 7, 13, 14, 16)."""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir, read_metrics

X_AXES = {"step": "outer step", "net_evals": "network evaluations (images)", "wall_s": "wall time (s)",
          "sequential_calls": "sequential batched network calls"}


def plot_reward_kl(run_dirs: Sequence[pathlib.Path], labels: Sequence[str], x: str = "step"):
    """Reward (batch mean ± std, and the fixed-key evaluation reward) and KL against `x`, runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        rows = read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")
        train = [r for r in rows if "reward_mean" in r]
        if not train:
            continue
        xs = np.array([r[x] for r in train])
        mean = np.array([r["reward_mean"] for r in train])
        std = np.array([r["reward_std"] for r in train])
        line, = ax_r.plot(xs, mean, label=label, lw=1)
        ax_r.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ev = [r for r in rows if "eval_reward" in r]
        ax_r.plot([r[x] for r in ev], [r["eval_reward"] for r in ev], "o", color=line.get_color(), ms=4)
        kl = [r for r in train if "kl" in r]
        ax_kl.plot([r[x] for r in kl], [r["kl"] for r in kl], "-o", ms=3, color=line.get_color(), label=label)
    ax_r.set(xlabel=X_AXES[x], ylabel="reward", title="reward (line: training batch ± std; dots: fixed keys)")
    ax_kl.set(xlabel=X_AXES[x], ylabel="KL(p ‖ π*(θ0))", title="Girsanov KL to the pretrained model")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    return fig


def evolution_strip(run_dir: pathlib.Path, n_images: int = 8, upscale: int = 2) -> pathlib.Path | None:
    """figures/evolution.png: one row per saved step (top: θ0) of the first `n_images` fixed-key samples,
    read from samples/step_*.npy."""
    from PIL import Image

    from idiff_cli.runs import atomic_path

    files = sorted((run_dir / "samples").glob("step_*.npy"))
    if not files:
        return None
    rows = []
    for path in files:
        images = np.load(path)[:n_images]  # uint8 [n, H, W, C]
        n, h, w, c = images.shape
        row = np.full((h + 2, n * (w + 2) + 2, c), 255, np.uint8)
        for i in range(n):
            row[1: 1 + h, 2 + i * (w + 2): 2 + i * (w + 2) + w] = images[i]
        rows.append(row)
    strip = np.concatenate(rows)
    image = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip)
    image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    target = run_dir / "figures" / "evolution.png"
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target


def finish_run(run_dir: RunDir) -> None:
    """The figures of one run: figures/reward_kl.png and figures/evolution.png."""
    run_dir.save_figure(plot_reward_kl([run_dir.path], [run_dir.path.name]), "reward_kl.png")
    evolution_strip(run_dir.path)


def report(run_dirs: Sequence[pathlib.Path], out: pathlib.Path, x: str = "step") -> list[pathlib.Path]:
    """Overlays several finetuning runs: `out`/reward_kl_<x>.png. Returns the files written."""
    if x not in X_AXES:
        raise UserError(f"unknown --x '{x}'; valid choices: {', '.join(X_AXES)}")
    for run_dir in run_dirs:
        if not (pathlib.Path(run_dir) / "metrics.jsonl").exists():
            raise UserError(f"'{run_dir}' is not a finetune run directory (no metrics.jsonl)")
    labels = []
    for run_dir in run_dirs:
        cfg = RunDir(run_dir).read_json("config.json") if (pathlib.Path(run_dir) / "config.json").exists() else {}
        labels.append(f"{pathlib.Path(run_dir).name}: {cfg.get('method', '?')} λ={cfg.get('lam', '?')} "
                      f"β={cfg.get('beta', '?')} lr={cfg.get('lr', '?')}")
    target = RunDir(out)
    return [target.save_figure(plot_reward_kl(run_dirs, labels, x), f"reward_kl_{x}.png")]
