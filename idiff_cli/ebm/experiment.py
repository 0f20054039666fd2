"""`idiff ebm-train`: energy-based models trained by Implicit Diffusion (Appendix A.1, Figs 11-12).

Every method is a `langevin.methods.Method` with the Γ_ref update, run by `langevin.experiment.segments`
(one jitted scan per segment, seeds vmapped and sharded). The host computes the quadrature metrics
of each logged (θ, chains) pair, appends them to metrics.jsonl, and saves an orbax checkpoint every
`checkpoint_every` steps; `--resume` restarts a method from its latest checkpoint and reproduces the
uninterrupted run exactly (same keys, same segment plan, same device count).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from idiff_cli import config as cfglib
from idiff_cli import registry
from idiff_cli.checkpoint import Checkpointer
from idiff_cli.ebm import figures, metrics, toy_data
from idiff_cli.ebm.energies import MLPEnergy
from idiff_cli.errors import UserError
from idiff_cli.langevin.experiment import segments
from idiff_cli.langevin.methods import LangevinState, Method, make_optimizer, make_step
from idiff_cli.langevin.potentials import GaussianMixture
from idiff_cli.parallel import seed_mesh, shard_leading
from idiff_cli.runs import RunDir, console, progress_bar

TRAINED = ("implicit", "nested", "short-run")
SAMPLERS = ("langevin-theta0", "langevin-theta-opt")  # the initial and the trained model, sampled (Fig. 12)
SNAPSHOT_TARGETS = (100, 1000, 10000)


@dataclasses.dataclass(frozen=True)
class EBMConfig:
    """`idiff ebm-train` settings (defaults: preset `paper`, Appendix A.1 "training from scratch")."""

    preset: str = "paper"
    energy: str = "wells"
    data: str = "wells"
    method: str = "implicit"
    T: tuple[int, ...] = (10,)
    theta0: tuple[float, ...] = (-7.0,) * 6 + (11.0,)
    hidden: tuple[int, ...] = (64, 64)
    steps: int = 40000
    batch: int = 1000
    seeds: int = 10
    gamma: float = 0.2
    optimizer: str = "sgd"
    eta: float = 0.1
    eta_schedule: str = "constant"
    samplers: bool = True
    log_every: int = 100
    checkpoint_every: int = 10000
    n_test: int = 10000
    seed: int = 0

    def method_names(self) -> list[str]:
        asked = [m.strip() for m in self.method.split(",") if m.strip()]
        return list(TRAINED) if "all" in asked else list(dict.fromkeys(asked))

    def validate(self) -> None:
        for name in ("steps", "batch", "seeds", "log_every", "checkpoint_every", "n_test"):
            cfglib.require_int(self, name)
        cfglib.require_int(self, "seed", minimum=0)
        cfglib.require_ints(self, "T")
        cfglib.require_ints(self, "hidden")
        for name in ("gamma", "eta"):
            cfglib.require_float(self, name)
        cfglib.require_choice(self, "optimizer", ("sgd", "adam"))
        cfglib.require_choice(self, "eta_schedule", ("constant", "inv-sqrt"))
        names = self.method_names()
        if not names or any(n not in TRAINED for n in names):
            bad = next((n for n in names if n not in TRAINED), self.method)
            raise UserError(f"unknown --method '{bad}'; valid choices: all, {', '.join(TRAINED)}")
        if self.checkpoint_every % self.log_every:
            raise UserError(f"--checkpoint-every must be a multiple of --log-every ({self.log_every}), "
                            f"got {self.checkpoint_every}")
        energy = build_energy(self)
        toy_data.get(self.data)
        n_params = getattr(energy, "n_params", None)
        if not hasattr(energy, "init") and n_params is not None and len(self.theta0) != n_params:
            raise UserError(f"--theta0 has {len(self.theta0)} entries; energy '{self.energy}' takes {n_params}")


PRESETS: dict[str, dict[str, Any]] = {
    # Appendix A.1, training from scratch: seven wells, θ0 = (−7, ..., −7, 11), 40,000 SGD steps.
    "paper": {},
    # A neural energy on a toy data set (beyond the paper).
    # Adam at 1e-4 with γ = 0.05: at 3e-4 θ outruns the persistent chains and two-moons diverges.
    "mlp": {"energy": "mlp", "data": "eight-gaussians", "steps": 5000, "seeds": 2, "gamma": 0.05,
            "optimizer": "adam", "eta": 1e-4, "log_every": 100, "checkpoint_every": 1000},
}


def build_energy(cfg: EBMConfig):
    energy = registry.get("energy", cfg.energy)
    return dataclasses.replace(energy, hidden=tuple(cfg.hidden)) if isinstance(energy, MLPEnergy) else energy


def build_methods(cfg: EBMConfig) -> list[Method]:
    """The trained methods (Γ_ref update) then, with `samplers`, Langevin at θ0 and at the trained θ."""
    methods = []
    for name in cfg.method_names():
        builder = registry.get("method", name)
        for T in (cfg.T if name != "implicit" else (1,)):
            methods.append(dataclasses.replace(builder(T=T, lam=0.0, gamma=cfg.gamma), update="reference"))
    if cfg.samplers:
        methods += [registry.get("method", name)(T=1, lam=0.0, gamma=cfg.gamma) for name in SAMPLERS]
    return methods


def snapshot_steps(cfg: EBMConfig) -> np.ndarray:
    """Logged steps whose chains and θ are kept: 0, ~100, ~1000, ~10000 and the last step."""
    rounded = [min(math.ceil(t / cfg.log_every) * cfg.log_every, cfg.steps) for t in SNAPSHOT_TARGETS]
    return np.unique([0, *rounded, cfg.steps])


def logged_steps(cfg: EBMConfig) -> np.ndarray:
    return np.unique(np.minimum(np.arange(0, cfg.steps + cfg.log_every, cfg.log_every), cfg.steps))


class Problem:
    """Everything a run shares across methods: energy, data, held-out points, initial state, keys."""

    def __init__(self, cfg: EBMConfig):
        self.cfg = cfg
        self.energy = build_energy(cfg)
        k_init, k_run, k_test, k_metric, k_theta = jax.random.split(jax.random.key(cfg.seed), 5)
        self.train, self.x_test = toy_data.held_out(toy_data.get(cfg.data), k_test, cfg.n_test)
        # A file's points are standardised; its NLL is reported in the file's units (+ log det = 2 log scale).
        self.nll_offset = 2 * math.log(self.train.scale) if isinstance(self.train, toy_data.ArrayData) else 0.0
        self.x0 = jax.random.normal(k_init, (cfg.seeds, 2, cfg.batch))  # p0 = N(0, I)
        self.keys = jax.random.split(k_run, cfg.seeds)
        self.metric_keys = jax.random.split(k_metric, cfg.seeds)
        if hasattr(self.energy, "init"):
            self.theta0 = jax.vmap(self.energy.init)(jax.random.split(k_theta, cfg.seeds))
        else:
            self.theta0 = jnp.tile(jnp.asarray(cfg.theta0, jnp.float32), (cfg.seeds, 1))
        target = getattr(self.train, "theta", None)
        same_family = (isinstance(self.energy, GaussianMixture) and isinstance(getattr(self.train, "potential", None),
                                                                                GaussianMixture)
                       and self.energy.centres == self.train.potential.centres)
        self.theta_target = target if same_family else None
        self.evaluate = metrics.make_evaluator(self.energy, self.train, self.x_test, self.theta_target)
        self.has_density = hasattr(self.train, "log_density")

    def metric_values(self, steps: np.ndarray, theta, x: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics [c, S] of logged steps [c] with θ [c, S, ...] and chains x [c, S, 2, B]."""
        c, s = x.shape[:2]
        keys = jax.vmap(lambda step: jax.vmap(lambda k: jax.random.fold_in(k, step))(self.metric_keys))(
            jnp.asarray(steps))
        flat = lambda a: jnp.reshape(a, (c * s,) + a.shape[2:])  # noqa: E731
        values = self.evaluate(jax.tree.map(flat, theta), flat(jnp.asarray(x)), flat(keys))
        values = {k: np.asarray(v).reshape(c, s) for k, v in values.items()}
        values["nll"] = values["nll"] + self.nll_offset
        return values


def metric_rows(method: Method, steps: np.ndarray, values: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """metrics.jsonl rows: per logged step, mean/min/max over seeds of every metric."""
    rows = []
    for i, step in enumerate(steps):
        row = {"method": method.name, "T": method.inner_steps, "step": int(step),
               "grad_evals": int(step) * method.inner_steps}
        for name, v in values.items():
            row.update({f"{name}_mean": float(v[i].mean()), f"{name}_min": float(v[i].min()),
                        f"{name}_max": float(v[i].max())})
        rows.append(row)
    return rows


def _flat_theta(theta, prefix: str) -> dict[str, np.ndarray]:
    """θ (an array or a Flax param tree) as npz entries `prefix`, or `prefix/<path>` per leaf."""
    if not isinstance(theta, dict):
        return {prefix: np.asarray(theta)}
    return {f"{prefix}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(theta, sep="/").items()}


def unflat_theta(arrays: dict[str, np.ndarray], prefix: str):
    """Inverse of `_flat_theta`."""
    if prefix in arrays:
        return arrays[prefix]
    leaves = {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
    return traverse_util.unflatten_dict(leaves, sep="/")


def run_method(problem: Problem, method: Method, start_theta, run_dir: RunDir, progress) -> dict[str, np.ndarray]:
    """Trains (or samples with) one method for all seeds, resuming from its latest checkpoint."""
    cfg = problem.cfg
    optimizer = make_optimizer(cfg.eta, cfg.eta_schedule, cfg.optimizer)
    step = make_step(method, problem.energy, None, cfg.gamma, optimizer, lambda key: problem.train.sample(key, cfg.batch))
    state = jax.vmap(lambda x, th: LangevinState(x, th, optimizer.init(th)))(problem.x0, start_theta)
    mesh = seed_mesh(cfg.seeds)
    state, keys = shard_leading((state, problem.keys), mesh)
    snaps = snapshot_steps(cfg)
    history = {"x": np.zeros((len(snaps),) + problem.x0.shape, np.float32),
               "theta": jax.tree.map(lambda a: np.zeros((len(snaps),) + a.shape, a.dtype), start_theta)}
    vector_theta = not isinstance(start_theta, dict)
    if vector_theta:
        history["theta_log"] = np.zeros((len(logged_steps(cfg)),) + start_theta.shape, np.float32)

    def record(steps, theta, x):
        values = problem.metric_values(steps, theta, x)
        for i, s in enumerate(steps):
            j = np.searchsorted(snaps, s)
            if j < len(snaps) and snaps[j] == s:
                history["x"][j] = x[i]
                jax.tree.map(lambda h, t: h.__setitem__(j, t[i]), history["theta"], theta)
        if vector_theta:
            history["theta_log"][np.searchsorted(logged_steps(cfg), steps)] = theta
        run_dir.append_metrics(metric_rows(method, steps, values))
        return values

    checkpointer = Checkpointer(run_dir.path / "checkpoints" / method.name, keep=2)
    done = checkpointer.latest_step() or 0
    _keep_rows(run_dir, method.name, done if done else -1)  # rows logged after the checkpoint go
    if done:
        restored, _ = checkpointer.restore({"state": state, "history": history})
        state, history = restored["state"], jax.tree.map(np.array, restored["history"])
    else:
        x, theta = np.asarray(state.x)[None], jax.tree.map(lambda a: np.asarray(a)[None], state.theta)
        record(np.array([0]), theta, x)

    task = progress.add_task(method.name, total=cfg.steps, completed=done, rate="", metric="-")
    work, t0, first = cfg.seeds * cfg.batch * method.inner_steps, time.perf_counter(), done
    headline = "kl_fwd" if problem.has_density else "nll"
    while done < cfg.steps:
        n = min(cfg.checkpoint_every, cfg.steps - done)
        for state, steps, x, theta, _ in segments(step, _no_statistic, state, keys, n, cfg.log_every, first_step=done):
            values = record(steps, theta, x)
            rate = work * (int(steps[-1]) - first) / (time.perf_counter() - t0) / 1e6
            progress.update(task, completed=int(steps[-1]), rate=f"{rate:6.1f}M p-steps/s",
                            metric=f"{headline} {values[headline][-1].mean():.4f}")
        done += n
        checkpointer.save(done, {"state": state, "history": history}, meta={"method": method.name})
    checkpointer.close()
    arrays = {"steps": logged_steps(cfg), "snapshot_steps": snaps, "snapshot_x": history["x"],
              "final_x": np.asarray(state.x), "T": np.asarray(method.inner_steps),
              "seconds": np.asarray(time.perf_counter() - t0)}
    arrays.update(_flat_theta(history["theta"], "snapshot_theta"))
    arrays.update(_flat_theta(jax.tree.map(np.asarray, state.theta), "final_theta"))
    if vector_theta:
        arrays["theta"] = history["theta_log"]
    run_dir.save_arrays(f"methods/{method.name}.npz", arrays)
    return arrays


def _no_statistic(x: jax.Array) -> jax.Array:
    """The in-scan statistic of `segments`: unused, the metrics need θ and run on the logged pairs."""
    return jnp.zeros((), x.dtype)


def _keep_rows(run_dir: RunDir, name: str, upto: int) -> None:
    """Drops the rows of method `name` logged after step `upto` (written after its last checkpoint)."""
    rows = run_dir.read_metrics()
    kept = [r for r in rows if r["method"] != name or r["step"] <= upto]
    if len(kept) != len(rows):
        run_dir.reset_metrics()
        run_dir.append_metrics(kept)


def claim(run_dir: RunDir, cfg: EBMConfig, resume: bool) -> None:
    """Writes config.json; a directory holding a run is only continued with --resume (same config)."""
    config = cfglib.to_dict(cfg)
    exists = (run_dir.path / "config.json").exists()
    if exists and not resume:
        raise UserError(f"run directory '{run_dir.path}' holds a run; pass --resume to continue it or pick a new --out")
    if resume and not exists:
        raise UserError(f"--resume: run directory '{run_dir.path}' holds no run (no config.json)")
    if not exists:
        run_dir.write_json("config.json", config)


def resumed_config(run_dir: RunDir, flags: dict[str, Any], preset: str | None, config_file=None) -> EBMConfig:
    """The config saved in `run_dir`; flags given with --resume must agree with it."""
    if config_file is not None:
        raise UserError("--resume continues with the run's saved config.json; drop --config")
    if not (run_dir.path / "config.json").exists():
        raise UserError(f"--resume: run directory '{run_dir.path}' holds no run (no config.json)")
    saved = run_dir.read_json("config.json")
    given = {k: v for k, v in flags.items() if v is not None}
    if preset is not None:
        given["preset"] = preset
    changed = sorted(k for k, v in given.items() if k in saved and saved[k] != (list(v) if isinstance(v, tuple) else v))
    if changed:
        raise UserError(f"--resume: flags differ from the saved config in {', '.join(changed)}; "
                        f"drop them to continue the run in '{run_dir.path}'")
    cfg = EBMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    cfg.validate()
    return cfg


def run(cfg: EBMConfig, run_dir: RunDir, resume: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Runs every method of `cfg` into `run_dir`: metrics.jsonl, methods/*.npz, arrays, figures, summary."""
    claim(run_dir, cfg, resume)
    problem = Problem(cfg)
    methods = build_methods(cfg)
    console.print(f"[bold]ebm-train[/]: energy {cfg.energy} on data {cfg.data}; {cfg.seeds} seeds x {cfg.batch} "
                  f"chains x {cfg.steps} steps on {seed_mesh(cfg.seeds).size} device(s) -> {run_dir.path}")
    per_method: dict[str, dict[str, np.ndarray]] = {}
    theta_opt = None
    with progress_bar("metric") as progress:
        for method in methods:
            saved = run_dir.path / "methods" / f"{method.name}.npz"
            if saved.exists():
                with np.load(saved) as npz:
                    per_method[method.name] = dict(npz)
            else:
                start = jax.tree.map(jnp.asarray, theta_opt) if method.start == "theta_opt" else problem.theta0
                per_method[method.name] = run_method(problem, method, start, run_dir, progress)
            if theta_opt is None and method.update != "none":
                theta_opt = unflat_theta(per_method[method.name], "final_theta")
    figures.make_all(run_dir, problem, per_method)
    summary = _summary(run_dir, cfg, per_method)
    run_dir.write_json("summary.json", summary)
    return per_method


def _summary(run_dir: RunDir, cfg: EBMConfig, per_method) -> dict[str, Any]:
    """Final metrics (mean and min..max over seeds at the last step) per method, printed as a table."""
    from rich.table import Table

    last = {}
    for row in run_dir.read_metrics():
        if row["step"] == cfg.steps:
            last[row["method"]] = row
    names = [n for n in ("kl_fwd", "kl_rev", "sigma_err", "hist_kl", "hist_kl_exact", "nll", "loglik")
             if any(f"{n}_mean" in r for r in last.values())]
    table = Table(title=f"ebm-train: step {cfg.steps}, mean over {cfg.seeds} seeds (min and max: summary.json)")
    for col in ("method", "grad evals", *names, "wall s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    summary = {}
    for name, arrays in per_method.items():
        row = last[name]
        summary[name] = {"grad_evals": row["grad_evals"], "seconds": float(arrays["seconds"]),
                         **{k: [row[f"{k}_mean"], row[f"{k}_min"], row[f"{k}_max"]] for k in names}}
        table.add_row(name, f"{row['grad_evals']:,}",
                      *[f"{row[f'{k}_mean']:.4f}" for k in names],
                      f"{float(arrays['seconds']):.1f}")
    console.print(table)
    console.print(f"outputs: {run_dir.path}/{{config.json, metrics.jsonl, methods/, summary.json, figures/, checkpoints/}}")
    return summary
