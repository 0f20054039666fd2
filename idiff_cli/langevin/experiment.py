"""Reward training of Langevin processes: the experiment of paper §5.1 / Appendix A.1.

All seeds of a method run together: one jitted function `vmap`s over seeds a `lax.scan` over
logging chunks of a `lax.scan` over outer steps, and the seed axis is sharded over the local
devices. The host only sees one snapshot per logged step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from idiff_cli import config as cfglib
from idiff_cli import registry
from idiff_cli.errors import UserError
from idiff_cli.langevin import figures, quadrature
from idiff_cli.langevin.methods import LangevinState, Method, make_optimizer, make_step
from idiff_cli.parallel import seed_mesh, shard_leading
from idiff_cli.runs import RunDir, console, progress_bar

METHOD_ORDER = ("implicit", "langevin-theta0", "nested", "unrolled", "guidance", "langevin-theta-opt")


@dataclasses.dataclass(frozen=True)
class LangevinConfig:
    """`idiff langevin-reward` settings (defaults: preset `reference`, Appendix A.1 sizes)."""

    preset: str = "reference"
    potential: str = "hexagon"
    reward: str = "corner"
    theta0: tuple[float, ...] = (1.5, 0.0, 1.5, 0.0, 1.5, 0.0)
    baseline: str = "all"
    steps: int = 5000
    batch: int = 1000
    seeds: int = 10
    gamma: float = 0.2
    eta: float = 0.1
    T: tuple[int, ...] = (1, 10, 100)
    guidance_lambda: float = dataclasses.field(default=1.0, metadata={"flag": "--lambda"})
    eta_schedule: str = "constant"
    lambda_kl: float = dataclasses.field(default=0.0, metadata={"flag": "--lambda-kl"})
    log_every: int = 10
    seed: int = 0

    def method_names(self) -> list[str]:
        """The registered method names to run, `implicit` first (it defines θ_opt)."""
        asked = [m.strip() for m in self.baseline.split(",") if m.strip()]
        if "all" in asked:
            return list(METHOD_ORDER)
        return ["implicit"] + [m for m in asked if m != "implicit"]

    def validate(self) -> None:
        for name in ("steps", "batch", "seeds", "log_every"):
            cfglib.require_int(self, name)
        cfglib.require_int(self, "seed", minimum=0)
        cfglib.require_ints(self, "T")
        cfglib.require_float(self, "gamma")
        cfglib.require_float(self, "eta")
        cfglib.require_float(self, "guidance_lambda", positive=False)
        cfglib.require_choice(self, "eta_schedule", ("constant", "inv-sqrt"))
        cfglib.require_float(self, "lambda_kl", positive=False)
        if self.lambda_kl < 0:
            raise UserError(f"--lambda-kl must be >= 0 (the weight β of a KL penalty), got {self.lambda_kl!r}")
        for name in self.method_names():
            if name not in ("all",) and ":" not in name and name not in registry.names("method"):
                raise UserError(f"unknown --baseline '{name}'; valid choices: all, {registry.choices_text('method')}")
        potential = registry.get("potential", self.potential)
        registry.get("reward", self.reward)
        n_params = getattr(potential, "n_params", None)
        if n_params is not None and len(self.theta0) != n_params:
            raise UserError(f"--theta0 has {len(self.theta0)} entries; potential '{self.potential}' takes {n_params}")
        if self.lambda_kl and not hasattr(potential, "sample"):
            raise UserError(f"--lambda-kl needs exact draws of π*(θ0); potential '{self.potential}' has no sample(); "
                            "valid choices: a Gaussian mixture potential (hexagon, hexagon-paper, seven-wells)")


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' released implementation, which made the paper's figures.
    "reference": {},
    # The text of Appendix A.1: unit hexagon, exp(−‖x − μ_i‖²), θ0 = (1, 0, 1, 0, 1, 0), μ = (1, 0.95).
    "paper": {"potential": "hexagon-paper", "reward": "corner-paper", "theta0": (1.0, 0.0, 1.0, 0.0, 1.0, 0.0)},
}


@dataclasses.dataclass
class MethodRun:
    """What one method produced, on the host."""

    method: Method
    steps: np.ndarray  # [L] logged outer steps (0 included)
    reward: np.ndarray  # [L, S] batch-mean reward per seed
    theta: np.ndarray  # [L, S, p]
    snapshots: np.ndarray  # [L, S, d, B] particles at logged steps
    seconds: float

    @property
    def final_theta(self) -> np.ndarray:
        return self.theta[-1]


@functools.lru_cache(maxsize=64)  # same step function -> compiled once (benchmarks re-run it)
def _segment_fn(step: Callable, statistic: Callable, log_every: int, n_logs: int) -> Callable:
    """jit(vmap over seeds): `n_logs` chunks of `log_every` outer steps; emits (x, θ, statistic(x)) per chunk."""

    def one_seed(state: LangevinState, key: jax.Array, first_step: jax.Array):
        def chunk(state, c):
            def body(s, k):
                return step(s, jax.random.fold_in(key, k)), None

            state, _ = jax.lax.scan(body, state, first_step + c * log_every + jnp.arange(log_every))
            return state, (state.x, state.theta, statistic(state.x))

        return jax.lax.scan(chunk, state, jnp.arange(n_logs))

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None)))


def segments(step: Callable, statistic: Callable, state: LangevinState, keys: jax.Array, n_steps: int,
             log_every: int, first_step: int = 0, max_segments: int = 25) -> Iterator[tuple]:
    """Runs outer steps first_step, ..., first_step + n_steps − 1 for every seed (step k uses key
    fold_in(keys[s], k)) as at most ~`max_segments` jitted segments, logging every `log_every` steps.

    Yields after each segment (one host sync): (state on device, logged steps [c], x [c, S, d, B],
    θ [c, S, ...] (any pytree), statistic(x) [c, S]) as host arrays, c logs per segment.
    """
    n_full, rest = divmod(n_steps, log_every)
    per_segment = max(1, math.ceil(n_full / max_segments))
    plan = [(log_every, min(per_segment, n_full - i)) for i in range(0, n_full, per_segment)]
    plan += [(rest, 1)] if rest else []
    done = first_step
    for every, count in plan:
        state, logged = _segment_fn(step, statistic, every, count)(state, keys, done)
        x, theta, r = jax.tree.map(lambda a: np.swapaxes(np.asarray(a), 0, 1), logged)  # [S, c] -> [c, S]
        yield state, done + every * (1 + np.arange(count)), x, theta, r
        done += every * count


def simulate(step: Callable, statistic: Callable, state: LangevinState, keys: jax.Array, n_steps: int,
             log_every: int, on_segment: Callable[[int, float], None] = lambda done, value: None):
    """Runs `n_steps` outer steps for every seed (see `segments`) and stacks the logs.

    `statistic` maps particles [d, B] to a scalar (e.g. the batch-mean reward), reported to
    `on_segment(steps_done, mean over seeds)` after each jitted segment.
    Returns host arrays: logged steps [L], x [L, S, d, B], θ [L, S, ...], statistic [L, S], with
    L = 1 + ceil(n_steps / log_every) (the initial state is logged as step 0).
    """
    xs, thetas, values = [np.asarray(state.x)], [np.asarray(state.theta)], [np.asarray(jax.vmap(statistic)(state.x))]
    steps = [0]
    for _, logged, x, theta, r in segments(step, statistic, state, keys, n_steps, log_every):
        xs.extend(x)
        thetas.extend(theta)
        values.extend(r)
        steps.extend(logged)
        on_segment(int(logged[-1]), float(r[-1].mean()))
    return np.asarray(steps), np.stack(xs), np.stack(thetas), np.stack(values)


def run_method(method: Method, cfg: LangevinConfig, potential, reward, x0: jax.Array, theta_start: jax.Array,
               keys: jax.Array, on_segment=lambda done, r: None, mesh=None) -> MethodRun:
    """Runs one method for all seeds, seed axis sharded over `mesh` (default: `seed_mesh`).

    x0: [S, d, B]; theta_start: [S, p]; keys: [S].
    """
    optimizer = make_optimizer(cfg.eta * method.lr_scale, cfg.eta_schedule)
    theta0 = jnp.asarray(cfg.theta0, jnp.float32)
    reference = (lambda key: potential.sample(key, theta0, cfg.batch)) if cfg.lambda_kl else None  # p_ref = π*(θ0)
    step = make_step(method, potential, reward, cfg.gamma, optimizer, reference)
    state = jax.vmap(lambda x, th: LangevinState(x, th, optimizer.init(th)))(x0, theta_start)
    state, keys = shard_leading((state, keys), mesh or seed_mesh(cfg.seeds))
    start = time.perf_counter()
    mean_reward = lambda x: jnp.mean(reward(x))  # noqa: E731
    steps, xs, thetas, rewards = simulate(step, mean_reward, state, keys, cfg.steps, cfg.log_every, on_segment)
    return MethodRun(method, steps, rewards, thetas, xs, time.perf_counter() - start)


def log_likelihood(potential, snapshots: np.ndarray, theta_ref: np.ndarray) -> np.ndarray:
    """Batch-mean log π*(θ_ref)[x] per logged step and seed: [L, S, d, B], [S, p] -> [L, S]."""
    log_density = getattr(potential, "log_density", None) or quadrature.log_density_fn(potential)
    per_seed = jax.vmap(lambda x, th: jnp.mean(log_density(x, th)), in_axes=(0, 0))
    fn = jax.jit(jax.vmap(per_seed, in_axes=(0, None)))
    return np.asarray(fn(jnp.asarray(snapshots), jnp.asarray(theta_ref)))


def metric_rows(run: MethodRun, loglik: np.ndarray, cfg: LangevinConfig) -> list[dict[str, Any]]:
    """metrics.jsonl rows: per logged step, mean/min/max over seeds of reward and log-likelihood."""
    rows = []
    for i, step in enumerate(run.steps):
        row = {"method": run.method.name, "T": run.method.inner_steps, "step": int(step),
               "grad_evals": int(step) * run.method.inner_steps}
        for name, values in (("reward", run.reward[i]), ("loglik", loglik[i])):
            row.update({f"{name}_mean": float(values.mean()), f"{name}_min": float(values.min()),
                        f"{name}_max": float(values.max())})
        rows.append(row)
    return rows


def build_methods(cfg: LangevinConfig) -> list[Method]:
    methods = []
    for name in cfg.method_names():
        builder = registry.get("method", name)
        Ts = cfg.T if name in ("nested", "unrolled", "short-run") else cfg.T[:1]
        for T in Ts:
            method = builder(T=T, lam=cfg.guidance_lambda, gamma=cfg.gamma)
            if cfg.lambda_kl and method.update != "none":  # F(p) = −E_p[R] + β KL(π*(θ0) ‖ p)
                method = dataclasses.replace(method, kl_weight=cfg.lambda_kl)
            methods.append(method)
    return methods


def run(cfg: LangevinConfig, run_dir: RunDir) -> dict[str, dict[str, np.ndarray]]:
    """Runs every method of `cfg`, streaming metrics to `run_dir`; writes arrays, figures, summary.

    Each finished method is saved at once (methods/<name>.npz, then its metrics rows), so re-running
    the same config into the same run directory resumes with the first unfinished method.
    Returns each method's arrays (see `_method_arrays`).
    """
    potential = registry.get("potential", cfg.potential)
    reward = registry.get("reward", cfg.reward)
    dim = getattr(potential, "dim", 2)
    k_init, k_run = jax.random.split(jax.random.key(cfg.seed))
    x0 = jax.random.normal(k_init, (cfg.seeds, dim, cfg.batch))  # p0 = N(0, I), shared by all methods
    keys = jax.random.split(k_run, cfg.seeds)
    theta0 = jnp.tile(jnp.asarray(cfg.theta0, jnp.float32), (cfg.seeds, 1))
    methods = build_methods(cfg)
    finished = _resume(run_dir, cfg, [m.name for m in methods])
    console.print(f"[bold]langevin-reward[/]: {cfg.seeds} seeds x {cfg.batch} particles x {cfg.steps} steps "
                  f"on {seed_mesh(cfg.seeds).size} device(s) -> {run_dir.path}"
                  + (f"\nresuming: {', '.join(finished)} already complete" if finished else ""))

    per_method: dict[str, dict[str, np.ndarray]] = {}
    with progress_bar("reward") as progress:
        for method in methods:
            if method.name in finished:
                with np.load(run_dir.path / "methods" / f"{method.name}.npz") as npz:
                    per_method[method.name] = dict(npz)
                continue
            theta_opt = per_method["implicit"]["theta"][-1] if "implicit" in per_method else None
            start_theta = theta0 if method.start == "theta0" else jnp.asarray(theta_opt)
            task = progress.add_task(method.name, total=cfg.steps, rate="", reward="-")
            work = cfg.seeds * cfg.batch * method.inner_steps
            t0 = time.perf_counter()

            def on_segment(done, r, task=task, work=work, t0=t0):
                rate = work * done / (time.perf_counter() - t0) / 1e6
                progress.update(task, completed=done, reward=f"{r:.3f}", rate=f"{rate:6.1f}M p-steps/s")

            result = run_method(method, cfg, potential, reward, x0, start_theta, keys, on_segment)
            theta_opt = result.final_theta if method.name == "implicit" else theta_opt
            per_method[method.name] = _method_arrays(result)
            run_dir.save_arrays(f"methods/{method.name}.npz", per_method[method.name])
            run_dir.append_metrics(metric_rows(result, log_likelihood(potential, result.snapshots, theta_opt), cfg))

    run_dir.save_arrays("arrays.npz", _arrays(per_method))
    figures.make_all(run_dir, potential, cfg.theta0)
    _print_summary(run_dir, cfg, per_method)
    return per_method


def _resume(run_dir: RunDir, cfg: LangevinConfig, names: list[str]) -> list[str]:
    """Claims `run_dir` for `cfg`; returns the methods already finished there (same config only).

    A method is finished when methods/<name>.npz exists and metrics.jsonl has all its rows; rows of
    unfinished methods are dropped, so they are written exactly once when the method reruns.
    """
    config = cfglib.to_dict(cfg)
    if (run_dir.path / "config.json").exists():
        previous = run_dir.read_json("config.json")
        if previous != json.loads(json.dumps(config)):
            changed = sorted(k for k in config if previous.get(k) != json.loads(json.dumps(config[k])))
            raise UserError(f"run directory '{run_dir.path}' holds a run with another config (differs in "
                            f"{', '.join(changed)}); pick a new --out")
    run_dir.write_json("config.json", config)
    n_rows = 1 + math.ceil(cfg.steps / cfg.log_every)
    rows = run_dir.read_metrics()
    finished = [n for n in names if (run_dir.path / "methods" / f"{n}.npz").exists()
                and sum(r["method"] == n for r in rows) == n_rows]
    run_dir.reset_metrics()
    run_dir.append_metrics(r for r in rows if r["method"] in finished)
    return finished


def _method_arrays(run: MethodRun) -> dict[str, np.ndarray]:
    """What a finished method keeps: θ trajectory, final samples, seed 0 at the Fig. 10 steps."""
    return {"steps": run.steps, "theta": run.theta, "final_x": run.snapshots[-1],
            "snapshots_seed0": run.snapshots[figures.snapshot_indices(run.steps), 0],
            "T": np.asarray(run.method.inner_steps), "seconds": np.asarray(run.seconds)}


def _arrays(per_method: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """arrays.npz: every method's θ trajectory and final samples, keyed `<method>/<array>`."""
    steps = per_method["implicit"]["steps"]
    out = {"steps": steps, "theta_opt": per_method["implicit"]["theta"][-1],
           "snapshot_steps": steps[figures.snapshot_indices(steps)]}
    for name, arrays in per_method.items():
        out.update({f"{name}/{key}": arrays[key] for key in ("theta", "final_x", "snapshots_seed0")})
    return out


def _print_summary(run_dir: RunDir, cfg: LangevinConfig, per_method: dict[str, dict[str, np.ndarray]]) -> None:
    from rich.table import Table

    rows: dict[str, list[dict]] = {}
    for row in run_dir.read_metrics():
        rows.setdefault(row["method"], []).append(row)
    table = Table(title=f"langevin-reward: last 2% of {cfg.steps} steps, {cfg.seeds} seeds (min..max)")
    for col in ("method", "T", "reward", "log-lik under π*(θ_opt)", "grad evals", "wall s", "M p-steps/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, arrays in per_method.items():
        T, seconds = int(arrays["T"]), float(arrays["seconds"])
        window = [row for row in rows[name] if row["step"] >= cfg.steps * 0.98]
        reward = np.mean([row["reward_mean"] for row in window])
        loglik = np.mean([row["loglik_mean"] for row in window])
        lo, hi = min(row["reward_min"] for row in window), max(row["reward_max"] for row in window)
        rate = cfg.seeds * cfg.batch * cfg.steps * T / seconds / 1e6
        table.add_row(name, str(T), f"{reward:.3f} ({lo:.3f}..{hi:.3f})", f"{loglik:.3f}",
                      f"{cfg.steps * T:,}", f"{seconds:.1f}", f"{rate:.1f}")
    console.print(table)
    console.print(f"outputs: {run_dir.path}/{{config.json, metrics.jsonl, arrays.npz, figures/}}")
