"""Figures of `idiff ebm-train`, drawn from the run directory's metrics and method arrays:

    fig11_samples_contours.png  paper Fig. 11: target, initial model, Implicit Diffusion, trained model
    fig12_metrics.png           paper Fig. 12: exact KLs, ‖σ(θ) − σ(θ*)‖, histogram KL, NLL, log-likelihood
                                against outer steps (mean over seeds, min/max band)
    grad_evals.png              the headline metric against gradient evaluations (sampling steps)
    sigma_theta.png             σ(θ) over steps (mixture energies)
    density_steps.png           the data beside the learned density exp(−V(·, θ_k))/Z at the snapshot steps

`report` redraws one run's figures from its files (the problem rebuilt from config.json), or overlays
the headline metric of several runs.
"""

from __future__ import annotations

import pathlib

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from idiff_cli.ebm.options import SCHEMA  # noqa: E402
from idiff_cli.ebm.problem import Problem  # noqa: E402
from idiff_cli.errors import UserError  # noqa: E402
from idiff_cli.langevin.figures import FigureDir, band, by_method, density_contours  # noqa: E402
from idiff_cli.langevin.runner import npz_tree  # noqa: E402
from idiff_cli.loop import read_config  # noqa: E402
from idiff_cli.runs import RunDir  # noqa: E402

PANELS = (("kl_fwd", "KL(p_data ‖ π*(θ)) exact", True), ("kl_rev", "KL(π*(θ) ‖ p_data) exact", True),
          ("sigma_err", "‖σ(θ) − σ(θ*)‖", True), ("hist_kl", "KL(histogram of chains ‖ π*(θ))", True),
          ("nll", "held-out NLL (nats)", False), ("loglik", "log p_data(chains) (batch mean)", False))


def _extent(problem) -> float:
    return float(np.ceil(np.quantile(np.abs(np.asarray(problem.x_test)), 0.999)) + 1.5)


def _theta(arrays, prefix, index=(0,)):
    """θ saved under `prefix` in a method's arrays, at `index` (default: seed 0 of the final θ)."""
    return jax.tree.map(lambda a: a[index], npz_tree(arrays, prefix))


def _scatter(ax, x, color):
    ax.scatter(x[0], x[1], s=1.5, alpha=0.4, color=color)


def fig11(run_dir, problem, per_method, trained):
    """Contour lines and samples (seed 0): target, initial model, Implicit Diffusion, trained model."""
    extent = _extent(problem)
    target = np.asarray(problem.train.sample(jax.random.key(0), problem.cfg.batch))
    panels = [("target p_data (exact draws)", None, target)]
    if "langevin-theta0" in per_method:
        panels.append(("initial model π*(θ0), Langevin", "langevin-theta0", per_method["langevin-theta0"]["final_x"][0]))
    panels.append((f"{trained}: chains and π*(θ_K)", trained, per_method[trained]["final_x"][0]))
    if "langevin-theta-opt" in per_method:
        panels.append(("trained model π*(θ_K), Langevin", "langevin-theta-opt",
                       per_method["langevin-theta-opt"]["final_x"][0]))
    cols = 2 if len(panels) == 4 else len(panels)
    fig, axes = plt.subplots(len(panels) // cols, cols, figsize=(4.2 * cols, 4.2 * len(panels) // cols), squeeze=False)
    for ax, (title, name, x) in zip(axes.ravel(), panels):
        if name is not None:
            density_contours(ax, problem.energy, _theta(per_method[name], "final_theta"), extent=extent)
        elif hasattr(problem.train, "potential"):  # a mixture data set: its exact contours
            density_contours(ax, problem.train.potential, np.asarray(problem.train.theta), extent=extent)
        else:
            ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])
        _scatter(ax, x, "C0" if name is None else "C3")
        ax.set_title(title, fontsize=10)
    return run_dir.save_figure(fig, "fig11_samples_contours.png")


def fig12(run_dir, curves):
    """Every available metric against outer steps, mean over seeds with a min/max band."""
    panels = [p for p in PANELS if any(f"{p[0]}_mean" in c for c in curves.values())]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (metric, title, log) in zip(axes.ravel(), panels):
        for name, c in curves.items():
            c = {k: v[1:] for k, v in c.items()}  # from the first logged step: log x axis
            if f"{metric}_mean" in c:
                band(ax, c["step"], c, metric, name)
            if metric == "hist_kl" and "hist_kl_exact_mean" in c and name == next(iter(curves)):
                ax.plot(c["step"], c["hist_kl_exact_mean"], "k--", lw=0.8, label="floor: exact draws of π*(θ)")
        ax.set(xlabel="outer steps", title=title, xscale="log")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7) if metric == "hist_kl" else None
    axes.ravel()[0].legend(fontsize=7)
    return run_dir.save_figure(fig, "fig12_metrics.png")


def fig_grad_evals(run_dir, curves, metric):
    """`metric` against gradient evaluations for the methods that train θ (log x axis)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, c in curves.items():
        if not name.startswith("langevin-"):
            band(ax, c["grad_evals"][1:], {k: v[1:] for k, v in c.items()}, metric, name)
    ax.set(xscale="log", yscale="log" if metric.startswith("kl") else "linear",
           xlabel="gradient evaluations (ULA steps per chain)", title=dict((p[0], p[1]) for p in PANELS)[metric])
    ax.legend(fontsize=8)
    return run_dir.save_figure(fig, "grad_evals.png")


def fig_sigma(run_dir, per_method, theta_target):
    """σ(θ) (mixture weights, mean over seeds) over steps; dashed: σ(θ*)."""
    names = [n for n, a in per_method.items() if "theta" in a and not n.startswith("langevin-")]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    target = np.asarray(jax.nn.softmax(np.asarray(theta_target)))
    for ax, name in zip(axes[0], names):
        weights = np.asarray(jax.nn.softmax(per_method[name]["theta"], axis=-1)).mean(axis=1)
        for k in range(weights.shape[1]):
            line, = ax.plot(per_method[name]["steps"], weights[:, k], lw=1, label=f"σ(θ)_{k + 1}")
            ax.axhline(target[k], color=line.get_color(), ls="--", lw=0.6)
        ax.set(title=name, xlabel="outer steps", ylim=(0, 1))
    axes[0, 0].legend(fontsize=7)
    return run_dir.save_figure(fig, "sigma_theta.png")


def fig_density(run_dir, problem, arrays, name):
    """The data beside the learned density of `name` (seed 0) at its snapshot steps."""
    extent = _extent(problem)
    steps = arrays["snapshot_steps"]
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(3 * (len(steps) + 1), 3.1))
    data = np.asarray(problem.train.sample(jax.random.key(0), 5000))
    axes[0].hist2d(data[0], data[1], bins=120, range=[[-extent, extent]] * 2, cmap="magma")
    axes[0].set(title=f"data ({problem.cfg.data})", aspect="equal", xticks=[], yticks=[])
    for j, step in enumerate(steps):
        density_contours(axes[j + 1], problem.energy, _theta(arrays, "snapshot_theta", (j, 0)), extent=extent,
                         filled=True)
        axes[j + 1].set_title(f"{name}: step {step}", fontsize=9)
    return run_dir.save_figure(fig, "density_steps.png")


def make_all(run_dir: RunDir, problem: Problem, per_method, out=None) -> list[pathlib.Path]:
    """Every figure from run_dir's metrics.jsonl and method arrays into `out` (default: run_dir/figures)."""
    target = out or run_dir
    curves = by_method(run_dir.read_metrics())
    trained = [n for n in per_method if not n.startswith("langevin-")]
    paths = [fig11(target, problem, per_method, trained[0]), fig12(target, curves),
             fig_grad_evals(target, curves, problem.headline)]
    if problem.theta_target is not None:
        paths.append(fig_sigma(target, per_method, problem.theta_target))
    return paths + [fig_density(target, problem, per_method[trained[0]], trained[0])]


def report(run_dirs: list[pathlib.Path], out: pathlib.Path, x: str = "step") -> list[pathlib.Path]:
    """`idiff report`: one run's figures again into `out`; several runs: the NLL and, where the data
    has a density, the exact KL of every method against `x` (step or grad_evals), one band per run."""
    if x not in ("step", "grad_evals", "wall_s"):
        raise UserError(f"--x {x}: ebm-train runs log step, grad_evals and wall_s")
    figure_dir = FigureDir(out)
    if len(run_dirs) == 1:
        run_dir = RunDir(run_dirs[0])
        cfg = read_config(SCHEMA, run_dir.path)
        per_method = {name: run_dir.load_arrays(f"methods/{name}.npz")  # in the order the methods ran
                      for name in by_method(run_dir.read_metrics())}
        return make_all(run_dir, Problem(cfg), per_method, figure_dir)
    runs = {str(r): by_method(RunDir(r).read_metrics()) for r in run_dirs}
    metrics = [m for m in ("kl_fwd", "nll") if all(f"{m}_mean" in c for curves in runs.values() for c in curves.values())]
    names = list(dict.fromkeys(n for curves in runs.values() for n in curves))
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(4 * len(names), 3.5 * len(metrics)), squeeze=False)
    for j, name in enumerate(names):
        for label, curves in runs.items():
            if name in curves:
                for i, metric in enumerate(metrics):
                    band(axes[i, j], curves[name][x], curves[name], metric, label)
        axes[0, j].set_title(name, fontsize=10)
        axes[-1, j].set_xlabel(x)
    for i, metric in enumerate(metrics):
        axes[i, 0].set_ylabel(dict((p[0], p[1]) for p in PANELS)[metric])
    axes[0, 0].legend(fontsize=7)
    return [figure_dir.save_figure(fig, "metrics_runs.png")]
