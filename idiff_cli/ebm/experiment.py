"""`idiff ebm-train`: energy-based models trained by Implicit Diffusion (Appendix A.1, Figs 11-12).

Every method is a Langevin method (`langevin.methods`) whose estimator is Γ_ref with the data as
reference, run as a resumable unit of the run loop (checkpoints/<method>/; seeds vmapped and
sharded, `langevin.simulate`). The host computes the quadrature metrics of each logged (θ, chains)
pair; the unit's history keeps θ per logged step (array energies) and chains and θ at the snapshot
steps. The samplers (Langevin at θ0 and at the trained θ) follow the trained methods.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from idiff_cli import registry
from idiff_cli.ebm import figures
from idiff_cli.ebm.options import SAMPLERS, SCHEMA, method_names
from idiff_cli.ebm.problem import Problem, flat_theta
from idiff_cli.langevin.methods import Components, Method, make_optimizer, reference
from idiff_cli.langevin.simulate import log_index, method_unit
from idiff_cli.loop import Run, logged_steps
from idiff_cli.parallel import seed_mesh
from idiff_cli.runs import RunDir, console, default_run_dir

SNAPSHOT_TARGETS = (100, 1000, 10000)
METRICS = ("kl_fwd", "kl_rev", "sigma_err", "hist_kl", "hist_kl_exact", "nll", "loglik")


def build_methods(cfg: Any, problem: Problem) -> list[Method]:
    """The trained methods (Γ_ref towards the data) then, with `samplers`, Langevin at θ0 and at the trained θ."""
    c = Components(problem.energy, None, cfg.gamma, 0.0,
                   lambda scale: make_optimizer(cfg.lr * scale, cfg.lr_schedule, cfg.optimizer),
                   reference(problem.energy, lambda key: problem.train.sample(key, cfg.batch)))
    methods = []
    for name in method_names(cfg.method):
        builder = registry.get("method", name)
        methods += [builder(c, T) for T in (cfg.T if name != "implicit" else (1,))]
    if cfg.samplers:
        methods += [registry.get("method", name)(c, 1) for name in SAMPLERS]
    return methods


def snapshot_slots(log_every: int) -> np.ndarray:
    """Logged steps whose chains and θ are kept: 0 and ~100, ~1000, ~10000 (those before the last step)."""
    return np.unique([0, *[-(-t // log_every) * log_every for t in SNAPSHOT_TARGETS]])


def main(cfg: Any, out: pathlib.Path | None) -> dict[str, dict[str, np.ndarray]]:
    """Runs every method of `cfg` into `out`: metrics.jsonl, methods/*.npz, figures, summary.json."""
    problem = Problem(cfg)
    methods = build_methods(cfg, problem)
    run_dir = RunDir(out or default_run_dir("ebm-train"))
    per_method: dict[str, dict[str, np.ndarray]] = {}
    with Run(SCHEMA, cfg, run_dir, cfg.ckpt_every) as run:
        run.print(f"[bold]ebm-train[/]: energy {cfg.energy} on data {cfg.data}; {cfg.seeds} seeds x {cfg.batch} "
                  f"chains x {cfg.steps} steps on {seed_mesh(cfg.seeds).size} device(s) -> {run_dir.path}")
        theta_opt = None
        for method in methods:
            start = problem.theta0 if method.start == "theta0" else theta_opt
            state = run.run(_unit(cfg, problem, method, start, run_dir))
            chains = jax.tree.map(np.asarray, state["chains"])
            if theta_opt is None and method.trains:
                theta_opt = chains.theta
            per_method[method.name] = _method_arrays(cfg, method, chains, jax.tree.map(np.asarray, state["history"]))
            run_dir.save_arrays(f"methods/{method.name}.npz", per_method[method.name])
        figures.make_all(run_dir, problem, per_method)
        run_dir.write_json("summary.json", _summary(run_dir, cfg))
        run.done("config.json, metrics.jsonl, methods/, summary.json, figures/, checkpoints/")
    return per_method


def _unit(cfg, problem: Problem, method: Method, start, run_dir: RunDir):
    slots = snapshot_slots(cfg.log_every)
    vector_theta = not isinstance(start, dict)

    def history(steps):
        h = {"x": np.zeros((len(slots),) + problem.x0.shape, np.float32),
             "theta": jax.tree.map(lambda a: np.zeros((len(slots),) + a.shape, a.dtype), start)}
        if vector_theta:
            h["theta_log"] = np.zeros((len(logged_steps(steps, cfg.log_every)),) + start.shape, np.float32)
        return h

    def record(h, steps, x, theta, _):
        values = problem.metric_values(steps, theta, x)
        for i, s in enumerate(steps):
            if s in slots:
                j = int(np.searchsorted(slots, s))
                h["x"][j] = x[i]
                jax.tree.map(lambda hist, t: hist.__setitem__(j, t[i]), h["theta"], theta)
        if vector_theta:
            h["theta_log"][log_index(cfg.steps, cfg.log_every, steps)] = theta
        rows = [{"T": method.T, "step": int(step), "grad_evals": int(step) * method.T,
                 **{f"{name}_{stat}": float(getattr(v[i], stat)()) for name, v in values.items()
                    for stat in ("mean", "min", "max")}} for i, step in enumerate(steps)]
        return h, rows

    def first_rows(h, chains):
        return record(h, np.array([0]), np.asarray(chains.x)[None],
                      jax.tree.map(lambda a: np.asarray(a)[None], chains.theta), None)

    work = cfg.seeds * cfg.batch * method.T
    return method_unit(method, problem.x0, start, problem.keys, cfg.steps, cfg.log_every,
                       _no_statistic, history, record, first_rows, run_dir.path / "checkpoints",
                       finite=(f"{problem.headline}_mean", "nll_mean"), progress=(f"{problem.headline}_mean",),
                       nan_hint="lower --lr or --gamma",
                       rate=lambda seconds, n: f"{work * n / seconds / 1e6:6.1f}M p-steps/s")


def _no_statistic(x):
    """The in-scan statistic: none, the metrics need θ and run on the host per logged pair."""
    return jnp.zeros((), x.dtype)


def _method_arrays(cfg, method: Method, chains, history) -> dict[str, np.ndarray]:
    """methods/<name>.npz: logged steps, snapshot chains and θ (the last one: the final state), θ per
    logged step (array energies)."""
    slots = snapshot_slots(cfg.log_every)
    shown = np.searchsorted(slots, slots[slots < cfg.steps])
    arrays = {"steps": logged_steps(cfg.steps, cfg.log_every), "snapshot_steps": np.append(slots[shown], cfg.steps),
              "snapshot_x": np.concatenate([history["x"][shown], chains.x[None]]), "final_x": chains.x,
              "T": np.asarray(method.T)}
    snapshot_theta = jax.tree.map(lambda h, t: np.concatenate([h[shown], t[None]]), history["theta"], chains.theta)
    arrays.update(flat_theta(snapshot_theta, "snapshot_theta"))
    arrays.update(flat_theta(chains.theta, "final_theta"))
    if "theta_log" in history:
        arrays["theta"] = history["theta_log"]
    return arrays


def _summary(run_dir: RunDir, cfg) -> dict[str, Any]:
    """Final metrics (mean and min..max over seeds at the last step) per method, printed as a table."""
    last = {row["method"]: row for row in run_dir.read_metrics() if row["step"] == cfg.steps}
    names = [n for n in METRICS if any(f"{n}_mean" in r for r in last.values())]
    table = Table(title=f"ebm-train: step {cfg.steps}, mean over {cfg.seeds} seeds (min and max: summary.json)")
    for col in ("method", "grad evals", *names, "wall s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    summary = {}
    for name, row in last.items():
        summary[name] = {"grad_evals": row["grad_evals"], "seconds": row["wall_s"],
                         **{k: [row[f"{k}_mean"], row[f"{k}_min"], row[f"{k}_max"]] for k in names}}
        table.add_row(name, f"{row['grad_evals']:,}", *[f"{row[f'{k}_mean']:.4f}" for k in names],
                      f"{row['wall_s']:.1f}")
    console.print(table)
    return summary
