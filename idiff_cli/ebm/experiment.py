"""`idiff ebm-train`: energy-based models trained by Implicit Diffusion (Appendix A.1, Figs 11-12).

Every method is a Langevin method (`langevin.methods`) whose estimator is Γ_ref with the data as
reference, run as a resumable unit of the run loop (checkpoints/<method>/; seeds vmapped and
sharded, `langevin.runner`). The host computes the quadrature metrics of each logged (θ, chains)
pair; the unit's history keeps θ per logged step (array energies) and chains and θ at the snapshot
steps. The samplers (Langevin at θ0 and at the trained θ) follow the trained methods.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from idiff_cli.ebm import figures
from idiff_cli.ebm.options import SAMPLERS, SCHEMA, method_names
from idiff_cli.ebm.problem import Problem
from idiff_cli.langevin.methods import Components, make_optimizer, reference
from idiff_cli.langevin.runner import (MethodRunner, Recording, Track, build_methods, final_metrics, print_table,
                                       snapshot_steps)
from idiff_cli.loop import Run
from idiff_cli.runs import RunDir, default_run_dir
from idiff_cli.sharding import seed_mesh

SNAPSHOT_TARGETS = (0, 100, 1000, 10000)  # the logged steps at or after these keep chains and θ
METRICS = ("kl_fwd", "kl_rev", "sigma_err", "hist_kl", "hist_kl_exact", "nll", "loglik")


def components(cfg: Any, problem: Problem) -> Components:
    """The pieces of every method: the energy and Γ_ref towards the data."""
    return Components(problem.energy, None, cfg.gamma, 0.0,
                      lambda scale: make_optimizer(cfg.lr * scale, cfg.lr_schedule, cfg.optimizer),
                      reference(problem.energy, lambda key: problem.train.sample(key, cfg.batch)))


def recording(problem: Problem) -> Recording:
    """Chains and θ at the snapshot steps and at the end, θ per logged step (array energies), and the
    quadrature metrics of every logged (θ, chains) pair."""
    tracks = (Track("snapshot_x", lambda x, theta: x, "snapshots"),
              Track("snapshot_theta", lambda x, theta: theta, "snapshots"),
              Track("final_x", lambda x, theta: x, "final"), Track("final_theta", lambda x, theta: theta, "final"))
    if not isinstance(problem.theta0, dict):
        tracks += (Track("theta", lambda x, theta: theta),)
    return Recording(tracks, lambda steps, x, theta, _: problem.metric_values(steps, theta, x))


def main(cfg: Any, out: pathlib.Path | None) -> dict[str, dict[str, np.ndarray]]:
    """Runs every method of `cfg` into `out`: metrics.jsonl, methods/*.npz, figures, summary.json."""
    problem = Problem(cfg)
    names = method_names(cfg.method) + (list(SAMPLERS) if cfg.samplers else [])
    methods = build_methods(names, components(cfg, problem), cfg.T)
    run_dir = RunDir(out or default_run_dir("ebm-train"))
    runner = MethodRunner(run_dir, problem.x0, problem.keys, cfg.steps, cfg.log_every,
                          snapshot_steps(SNAPSHOT_TARGETS, cfg.log_every),
                          finite=(f"{problem.headline}_mean", "nll_mean"), progress=(f"{problem.headline}_mean",))
    with Run(SCHEMA, cfg, run_dir, cfg.ckpt_every) as run:
        run.print(f"[bold]ebm-train[/]: energy {cfg.energy} on data {cfg.data}; {cfg.seeds} seeds x {cfg.batch} "
                  f"chains x {cfg.steps} steps on {seed_mesh(cfg.seeds).size} device(s) -> {run_dir.path}")
        per_method = runner.run(run, methods, problem.theta0, lambda theta_opt: recording(problem))
        figures.make_all(run_dir, problem, per_method)
        run_dir.write_json("summary.json", _summary(run_dir, cfg))
        run.done("config.json, metrics.jsonl, methods/, summary.json, figures/, checkpoints/")
    return per_method


def _summary(run_dir: RunDir, cfg) -> dict[str, Any]:
    """Final metrics (mean and min..max over seeds at the last step) per method, printed as a table."""
    final = final_metrics(run_dir.read_metrics(), METRICS, cfg.steps)
    names = [k for k in METRICS if any(k in m for _, m in final.values())]
    print_table(f"ebm-train: step {cfg.steps}, mean over {cfg.seeds} seeds (min and max: summary.json)",
                ("method", "grad evals", *names, "wall s"),
                [(name, f"{last['grad_evals']:,}", *[f"{m[k][0]:.4f}" for k in names], f"{last['wall_s']:.1f}")
                 for name, (last, m) in final.items()])
    return {name: {"grad_evals": last["grad_evals"], "seconds": last["wall_s"], **m} for name, (last, m) in final.items()}
