"""Figures of the Langevin reward experiment: paper Figs 4, 5, 8, 9 and 10 (Appendix A.1).

Everything is drawn from the run directory alone: curves from metrics.jsonl (mean over seeds with
a min/max band, as in the paper), samples and θ trajectories from arrays.npz. `report` redraws one
run's figures, or overlays the reward and log-likelihood curves of several runs.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli import registry, storage  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.langevin import quadrature  # noqa: E402
from idiff_cli.runs import RunDir, save_figure  # noqa: E402

SNAPSHOT_TARGETS = (100, 1000, 2500)


def snapshot_indices(steps: np.ndarray) -> np.ndarray:
    """Indices of the logged steps shown in Fig. 10: the first logged step, 100, 1000, 2500, last."""
    targets = [steps[1], *[t for t in SNAPSHOT_TARGETS if t < steps[-1]], steps[-1]]
    return np.unique([int(np.searchsorted(steps, t)) for t in targets])


def by_method(rows: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["method"]].append(row)
    return {m: {k: np.array([r[k] for r in rs]) for k in rs[0] if k != "method"} for m, rs in grouped.items()}


def band(ax, x, curves, metric, label, mean=True, color=None):
    """The min/max band of `metric` over seeds, with its mean as a line (`mean`) or alone (Fig. 9)."""
    if mean:
        line, = ax.plot(x, curves[f"{metric}_mean"], label=label, lw=1.2, color=color)
        color = line.get_color()
    ax.fill_between(x, curves[f"{metric}_min"], curves[f"{metric}_max"], color=color, alpha=0.2 if mean else 0.45,
                    lw=0, label=None if mean else label)


def density_contours(ax, potential, theta, extent=9.0, n=200, filled=False):
    """Contour lines (or, `filled`, an image) of π*(θ) on [−extent, extent]²; θ may be a pytree."""
    axis = np.linspace(-extent, extent, n)
    x0, x1 = np.meshgrid(axis, axis, indexing="ij")
    points = jnp.asarray(np.stack([x0.ravel(), x1.ravel()]), jnp.float32)
    log_density = getattr(potential, "log_density", None) or quadrature.log_density_fn(potential)
    theta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), theta)
    density = np.exp(np.asarray(jax.jit(log_density)(points, theta)).reshape(n, n))
    if filled:
        ax.imshow(density.T, origin="lower", extent=(-extent, extent, -extent, extent), cmap="magma")
    else:
        ax.contour(x0, x1, density, levels=8, colors="0.4", linewidths=0.6)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _main_methods(names: list[str]) -> list[str]:
    """One curve per method: nested/unrolled/short-run at their largest T (the paper's T = 100)."""
    keep = []
    for family in ("nested", "unrolled", "short-run"):
        members = [n for n in names if n.startswith(family + "-T")]
        if members:
            keep.append(max(members, key=lambda n: int(n.split("-T")[1])))
    return [n for n in names if not n.startswith(("nested-T", "unrolled-T", "short-run-T")) or n in keep]


def fig4(run_dir, potential, arrays, names, theta0):
    """Contours of π*(θ_opt) with the samples of Implicit Diffusion (and π*(θ0) with Langevin θ0)."""
    panels = [("implicit", arrays["theta_opt"][0], "Implicit Diffusion, π*(θ_opt)")]
    if "langevin-theta0" in names:
        panels.insert(0, ("langevin-theta0", theta0, "Langevin θ0, π*(θ0)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, theta, title) in zip(axes[0], panels):
        density_contours(ax, potential, theta)
        x = arrays[f"{name}/final_x"][0]
        ax.scatter(x[0], x[1], s=2, alpha=0.5, color="C3")
        ax.set_title(title, fontsize=10)
    return run_dir.save_figure(fig, "fig4_samples_contours.png")


def fig5(run_dir, curves, mean=True, name="fig5_reward_loglik.png"):
    """Reward and log-likelihood under π*(θ_opt) against outer steps: the mean over seeds with the
    min/max band (Fig. 5), or, without `mean`, the bands alone (Fig. 9)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(_main_methods(list(curves))):
        band(a, curves[method]["step"], curves[method], "reward", method, mean, f"C{i}")
        band(b, curves[method]["step"], curves[method], "loglik", method, mean, f"C{i}")
    what = "" if mean else ": min/max over seeds"
    a.set(xlabel="outer steps", ylabel="reward (batch mean)", title="Reward" + what)
    b.set(xlabel="outer steps", ylabel="log π*(θ_opt)(x) (batch mean)", title="Log-likelihood (higher is better)" + what)
    b.legend(fontsize=8)
    return run_dir.save_figure(fig, name)


def fig9(run_dir, curves):
    """Fig. 9: Fig. 5's confidence intervals alone (the min and max over seeds at each step, no mean)."""
    return fig5(run_dir, curves, mean=False, name="fig9_bands.png")


def fig8(run_dir, curves):
    """Implicit Diffusion, nested loop and unrolling against gradient evaluations, every T.

    nested-T1 is Implicit Diffusion itself (same keys, same numbers), so it is drawn once.
    """
    names = [n for n in curves
             if n == "implicit" or n.startswith(("nested-T", "unrolled-T", "short-run-T")) and n != "nested-T1"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        c = {k: v[1:] for k, v in curves[name].items()}  # from the first logged step: log x axis
        label = "implicit (= nested-T1)" if name == "implicit" and "nested-T1" in curves else name
        band(a, c["grad_evals"], c, "reward", label)
        band(b, c["grad_evals"], c, "loglik", label)
    for ax, title in ((a, "Reward"), (b, "Log-likelihood under π*(θ_opt)")):
        ax.set(xscale="log", xlabel="gradient evaluations (sampling steps)", title=title)
    b.legend(fontsize=8)
    return run_dir.save_figure(fig, "fig8_grad_evals.png")


def fig10(run_dir, potential, arrays, names, theta0):
    """Samples of every method (seed 0) at selected steps over π*(θ0) or π*(θ_opt) contours."""
    names = _main_methods(names)
    steps = arrays["snapshot_steps"]
    fig, axes = plt.subplots(len(names), len(steps), figsize=(2.2 * len(steps), 2.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        theta = theta0 if name in ("langevin-theta0", "guidance") else arrays["theta_opt"][0]
        for j, step in enumerate(steps):
            ax = axes[i, j]
            density_contours(ax, potential, theta, n=120)
            x = arrays[f"{name}/snapshots_seed0"][j]
            ax.scatter(x[0], x[1], s=1, alpha=0.4, color=f"C{i}")
            if i == 0:
                ax.set_title(f"step {step}", fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    return run_dir.save_figure(fig, "fig10_dynamics.png")


def fig10_sigma(run_dir, arrays, names):
    """σ(θ) (the mixture weights) over outer steps, mean over seeds, for the methods that train θ."""
    names = [n for n in _main_methods(names) if np.ptp(arrays[f"{n}/theta"], axis=0).max() > 0]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        weights = np.asarray(jax.nn.softmax(jnp.asarray(arrays[f"{name}/theta"]), axis=-1)).mean(axis=1)  # [L, p]
        for k in range(weights.shape[1]):
            ax.plot(arrays["steps"], weights[:, k], label=f"σ(θ)_{k + 1}")
        ax.set(title=name, xlabel="outer steps", ylim=(0, 1))
    axes[0, 0].legend(fontsize=7)
    return run_dir.save_figure(fig, "fig10_sigma_theta.png")


class FigureDir:
    """Where figures go: `save_figure(fig, name)` writes <path>/<name> (PNG) and closes the figure."""

    def __init__(self, path: pathlib.Path):
        self.path = storage.path(path)

    def save_figure(self, fig, name: str) -> pathlib.Path:
        return save_figure(fig, self.path / name)


def make_all(run_dir: RunDir, potential, theta0, out=None) -> list[pathlib.Path]:
    """Draws every figure from run_dir's metrics.jsonl and arrays.npz into `out` (default: run_dir/figures)."""
    curves = by_method(run_dir.read_metrics())
    names = list(curves)
    theta0 = np.asarray(theta0, np.float32)
    target = out or run_dir
    arrays = run_dir.load_arrays("arrays.npz")
    return [fig4(target, potential, arrays, names, theta0), fig5(target, curves), fig8(target, curves),
            fig9(target, curves), fig10(target, potential, arrays, names, theta0), fig10_sigma(target, arrays, names)]


def report(run_dirs: list[pathlib.Path], out: pathlib.Path, x: str = "step") -> list[pathlib.Path]:
    """`idiff report`: one run's figures again into `out`; several runs: each method's reward and
    log-likelihood (mean over seeds, min/max band) against `x` (step or grad_evals), one curve per run."""
    if x not in ("step", "grad_evals", "wall_s"):
        raise UserError(f"--x {x}: langevin-reward runs log step, grad_evals and wall_s")
    figure_dir = FigureDir(out)
    if len(run_dirs) == 1:
        config = RunDir(run_dirs[0]).read_json("config.json", ("potential", "theta0"))
        return make_all(RunDir(run_dirs[0]), registry.get("potential", config["potential"]), config["theta0"],
                        figure_dir)
    runs = {str(r): by_method(RunDir(r).read_metrics()) for r in run_dirs}
    names = list(dict.fromkeys(n for curves in runs.values() for n in _main_methods(list(curves))))
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for j, name in enumerate(names):
        for label, curves in runs.items():
            if name in curves:
                for i, metric in enumerate(("reward", "loglik")):
                    band(axes[i, j], curves[name][x], curves[name], metric, label)
        axes[0, j].set_title(name, fontsize=10)
        axes[1, j].set_xlabel(x)
    axes[0, 0].set_ylabel("reward (batch mean)")
    axes[1, 0].set_ylabel("log π*(θ_opt)(x)")
    axes[0, 0].legend(fontsize=7)
    return [figure_dir.save_figure(fig, "reward_loglik_runs.png")]
