"""`idiff langevin-reward`: reward training of Langevin processes (paper §5.1 / Appendix A.1).

Each method is a resumable unit of the run loop (checkpoints/<method>/), all seeds run together
(`simulate`). `implicit` runs first: its final θ is θ_opt, the start of `langevin-theta-opt` and the
parameter of the log-likelihood columns, log π*(θ_opt)[x] averaged over the batch. The methods after
`implicit` log it as they run; `implicit`'s own rows get it once implicit has finished, from the
samples its unit keeps. Growing `--steps` continues every method from its checkpoint; the methods
after `implicit` keep the θ_opt they started from.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from idiff_cli import registry
from idiff_cli.errors import UserError
from idiff_cli.langevin import figures, quadrature
from idiff_cli.langevin.methods import Components, Method, add, covariance, make_optimizer, reference, scaled
from idiff_cli.langevin.options import PER_T, SCHEMA, method_names
from idiff_cli.langevin.simulate import log_index, method_unit
from idiff_cli.loop import Run, logged_steps
from idiff_cli.parallel import seed_mesh
from idiff_cli.runs import RunDir, console, default_run_dir

STATS = ("mean", "min", "max")


def components(cfg: Any, potential, reward) -> Components:
    """The pieces of every method: Γ_reward, plus β Γ_ref with exact draws of π*(θ0) when β > 0."""
    theta0 = jnp.asarray(cfg.theta0, jnp.float32)
    penalty = scaled(cfg.beta, reference(potential, lambda key: potential.sample(key, theta0, cfg.batch))) \
        if cfg.beta else None
    return Components(potential, reward, cfg.gamma, cfg.lam,
                      lambda scale: make_optimizer(cfg.lr * scale, cfg.lr_schedule),
                      add(covariance(potential, reward), penalty), penalty)


def build_methods(cfg: Any, c: Components) -> list[Method]:
    """Every method of `--method` (per value of --T for nested, unrolled and short-run), implicit first."""
    methods = []
    for name in method_names(cfg.method):
        if ":" not in name and name not in registry.names("method"):
            raise UserError(f"unknown --method '{name}'; valid choices: all, {registry.choices_text('method')}")
        builder = registry.get("method", name)
        methods += [builder(c, T) for T in (cfg.T if name in PER_T else cfg.T[:1])]
    return methods


def check(cfg: Any, potential) -> None:
    n_params = getattr(potential, "n_params", None)
    if n_params is not None and len(cfg.theta0) != n_params:
        raise UserError(f"--theta0 has {len(cfg.theta0)} entries; potential '{cfg.potential}' takes {n_params}")
    if cfg.beta and not hasattr(potential, "sample"):
        raise UserError(f"--beta needs exact draws of π*(θ0); potential '{cfg.potential}' has no sample(); "
                        "valid choices: a Gaussian mixture potential (hexagon, hexagon-paper, seven-wells)")


def snapshot_slots(steps: int, log_every: int) -> np.ndarray:
    """Logged steps whose samples (seed 0) Fig. 10 shows before the last one: the first logged step and
    100, 1000, 2500 rounded up to logged steps (those before `steps` are shown)."""
    del steps
    return np.unique([-(-t // log_every) * log_every for t in (log_every, *figures.SNAPSHOT_TARGETS)])


def loglik_fn(potential):
    """(x [c, S, d, B], θ_opt [S, p]) -> batch-mean log π*(θ_opt)[x] [c, S]."""
    log_density = getattr(potential, "log_density", None) or quadrature.log_density_fn(potential)
    per_seed = jax.vmap(lambda x, th: jnp.mean(log_density(x, th)))
    return jax.jit(jax.vmap(per_seed, in_axes=(0, None)))


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    return {f"{name}_{s}": float(getattr(values, s)()) for s in STATS}


def main(cfg: Any, out: pathlib.Path | None) -> dict[str, dict[str, np.ndarray]]:
    """Runs every method of `cfg` into `out`; writes methods/*.npz, arrays.npz, figures and a summary."""
    potential = registry.get("potential", cfg.potential)
    reward = registry.get("reward", cfg.reward)
    check(cfg, potential)
    methods = build_methods(cfg, components(cfg, potential, reward))
    run_dir = RunDir(out or default_run_dir("langevin-reward"))
    dim = getattr(potential, "dim", 2)
    k_init, k_run = jax.random.split(jax.random.key(cfg.seed))
    x0 = jax.random.normal(k_init, (cfg.seeds, dim, cfg.batch))  # p0 = N(0, I), shared by all methods
    keys = jax.random.split(k_run, cfg.seeds)
    theta0 = jnp.tile(jnp.asarray(cfg.theta0, jnp.float32), (cfg.seeds, 1))
    loglik = loglik_fn(potential)
    mean_reward = lambda x: jnp.mean(reward(x))  # noqa: E731
    per_method: dict[str, dict[str, np.ndarray]] = {}
    with Run(SCHEMA, cfg, run_dir, cfg.ckpt_every) as run:
        run.print(f"[bold]langevin-reward[/]: {cfg.seeds} seeds x {cfg.batch} particles x {cfg.steps} steps "
                  f"on {seed_mesh(cfg.seeds).size} device(s) -> {run_dir.path}")
        theta_opt = None
        for method in methods:
            if method.start == "theta_opt" and theta_opt is None:
                raise UserError(f"method {method.name} starts from θ_opt: run a trained method before it")
            start = theta0 if method.start == "theta0" else jnp.asarray(theta_opt)
            state = run.run(_unit(cfg, method, x0, start, keys, mean_reward, loglik, theta_opt, run_dir))
            chains = jax.tree.map(np.asarray, state["chains"])
            history = jax.tree.map(np.asarray, state["history"])
            if theta_opt is None:
                theta_opt = chains.theta
                _add_loglik(run_dir, method.name, cfg, loglik(history["x"], theta_opt))
            per_method[method.name] = _method_arrays(cfg, method, chains, history)
            run_dir.save_arrays(f"methods/{method.name}.npz", per_method[method.name])
        run_dir.save_arrays("arrays.npz", _arrays(per_method))
        figures.make_all(run_dir, potential, cfg.theta0)
        _print_summary(run_dir, cfg)
        run.done("config.json, metrics.jsonl, methods/, arrays.npz, figures/, checkpoints/")
    return per_method


def _unit(cfg, method: Method, x0, start, keys, mean_reward, loglik, theta_opt, run_dir: RunDir):
    """The unit of one method: history θ [L, S, p], seed 0's samples at the Fig. 10 slots and, for the
    method that defines θ_opt, all samples [L, S, d, B] (its log-likelihood needs the final θ)."""
    slots = snapshot_slots(cfg.steps, cfg.log_every)
    keep_x = theta_opt is None
    p, (s, d, b) = start.shape[-1], x0.shape

    def history(steps):
        n = len(logged_steps(steps, cfg.log_every))
        h = {"theta": np.zeros((n, s, p), np.float32), "snapshots_seed0": np.zeros((len(slots), d, b), np.float32)}
        if keep_x:
            h["x"] = np.zeros((n, s, d, b), np.float32)
        return h

    def record(h, steps, x, theta, rewards):
        h["theta"][log_index(cfg.steps, cfg.log_every, steps)] = theta
        for i, step in enumerate(steps):
            if step in slots:
                h["snapshots_seed0"][np.searchsorted(slots, step)] = x[i, 0]
        if keep_x:
            h["x"][log_index(cfg.steps, cfg.log_every, steps)] = x
        logliks = None if keep_x else np.asarray(loglik(jnp.asarray(x), theta_opt))
        rows = []
        for i, step in enumerate(steps):
            row = {"T": method.T, "step": int(step), "grad_evals": int(step) * method.T,
                   **_stats("reward", rewards[i])}
            if logliks is not None:
                row.update(_stats("loglik", logliks[i]))
            rows.append(row)
        return h, rows

    def first_rows(h, chains):
        x = np.asarray(chains.x)[None]
        return record(h, np.array([0]), x, np.asarray(chains.theta)[None],
                      np.asarray(jax.vmap(mean_reward)(chains.x))[None])

    work = cfg.seeds * cfg.batch * method.T
    return method_unit(method, x0, start, keys, cfg.steps, cfg.log_every, mean_reward, history, record, first_rows,
                       run_dir.path / "checkpoints", finite=("reward_mean",), progress=("reward_mean",),
                       nan_hint="lower --lr or --gamma",
                       rate=lambda seconds, n: f"{work * n / seconds / 1e6:6.1f}M p-steps/s")


def _add_loglik(run_dir: RunDir, name: str, cfg, values: np.ndarray) -> None:
    """Writes the log-likelihood columns of method `name`'s rows (values [L, S] per logged step)."""
    rows = run_dir.read_metrics()
    for row in rows:
        if row.get("method") == name:
            row.update(_stats("loglik", values[log_index(cfg.steps, cfg.log_every, row["step"])]))
    run_dir.reset_metrics(rows)


def _method_arrays(cfg, method: Method, chains, history) -> dict[str, np.ndarray]:
    """What a finished method keeps: θ trajectory, final samples, seed 0 at the Fig. 10 steps."""
    slots = snapshot_slots(cfg.steps, cfg.log_every)
    shown = slots[slots < cfg.steps]
    snapshots = np.concatenate([history["snapshots_seed0"][np.searchsorted(slots, shown)], chains.x[None, 0]])
    return {"steps": logged_steps(cfg.steps, cfg.log_every), "theta": history["theta"], "final_x": chains.x,
            "snapshot_steps": np.append(shown, cfg.steps), "snapshots_seed0": snapshots, "T": np.asarray(method.T)}


def _arrays(per_method: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """arrays.npz: every method's θ trajectory and final samples, keyed `<method>/<array>`."""
    first = next(iter(per_method.values()))
    out = {"steps": first["steps"], "theta_opt": first["theta"][-1], "snapshot_steps": first["snapshot_steps"]}
    for name, arrays in per_method.items():
        out.update({f"{name}/{key}": arrays[key] for key in ("theta", "final_x", "snapshots_seed0")})
    return out


def _print_summary(run_dir: RunDir, cfg) -> None:
    rows: dict[str, list[dict]] = {}
    for row in run_dir.read_metrics():
        rows.setdefault(row["method"], []).append(row)
    table = Table(title=f"langevin-reward: last 2% of {cfg.steps} steps, {cfg.seeds} seeds (min..max)")
    for col in ("method", "T", "reward", "log-lik under π*(θ_opt)", "grad evals", "wall s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, method_rows in rows.items():
        window = [row for row in method_rows if row["step"] >= cfg.steps * 0.98]
        reward = np.mean([row["reward_mean"] for row in window])
        loglik = np.mean([row["loglik_mean"] for row in window])
        lo, hi = min(row["reward_min"] for row in window), max(row["reward_max"] for row in window)
        last = method_rows[-1]
        table.add_row(name, str(last["T"]), f"{reward:.3f} ({lo:.3f}..{hi:.3f})", f"{loglik:.3f}",
                      f"{last['grad_evals']:,}", f"{last['wall_s']:.1f}")
    console.print(table)
