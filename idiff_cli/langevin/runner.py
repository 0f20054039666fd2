"""Runs Langevin methods (`methods.py`) for all seeds as resumable units of the run loop, and keeps
what each records: the runner of `idiff langevin-reward` and `idiff ebm-train`.

A method's unit state is {"chains": the vmapped LangevinState (seed axis sharded over the local
devices), "history": host arrays of the logged steps}. What a history holds is a list of `Track`s:
a value of each logged (x, θ) kept at every logged step, at the snapshot steps (the logged steps at
or after a few targets, for figures of the dynamics), or of the final state only. The per-log arrays
have one entry per logged step of the run so far and grow with `--steps`. Each logged step is one
metrics row: T, step, gradient evaluations (step × T) and mean, min and max over seeds of each metric.

Methods run in order, each from θ0 or from θ_opt, the final θ of the first trained method; a
method's arrays go to methods/<name>.npz.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from rich.table import Table

from idiff_cli import registry
from idiff_cli.checkpoint import Checkpointer
from idiff_cli.errors import UserError
from idiff_cli.langevin.methods import Components, LangevinState, Method
from idiff_cli.langevin.options import PER_T
from idiff_cli.langevin.simulate import advance
from idiff_cli.loop import Run, Unit, logged_steps, segments_of
from idiff_cli.runs import RunDir, console
from idiff_cli.sharding import seed_mesh, shard_leading

STATS = ("mean", "min", "max")  # over seeds, per metric and logged step

# metrics(steps [c], x [c, S, d, B], θ [c, S, ...], statistic [c, S]) -> {metric: values [c, S]}
Metrics = Callable[[np.ndarray, np.ndarray, Any, np.ndarray], dict[str, np.ndarray]]


class Track(NamedTuple):
    """An array a method keeps, `value(x [c, S, d, B], θ [c, S, ...]) -> [c, ...]` (a pytree like θ
    or an array) of logged states: at every logged step (at="log"), at the snapshot steps then the
    final state (at="snapshots"), or of the final state alone, without the leading axis (at="final").
    Stored in methods/<name>.npz as `name` (a pytree as `name/<path>`) when `saved`."""

    name: str
    value: Callable[[np.ndarray, Any], Any]
    at: str = "log"
    saved: bool = True


class Recording(NamedTuple):
    """What a method's unit records: its tracks and its metrics."""

    tracks: tuple[Track, ...]
    metrics: Metrics


def build_methods(names: Iterable[str], c: Components, T: Sequence[int]) -> list[Method]:
    """The methods of `names` in order (registered names or package.module:builder plug-ins): one per
    value of T for the methods of PER_T, one at T[0] for the others."""
    methods = []
    for name in names:
        if ":" not in name and name not in registry.names("method"):
            raise UserError(f"unknown --method '{name}'; valid choices: all, {registry.choices_text('method')}")
        methods += [registry.get("method", name)(c, t) for t in (T if name in PER_T else T[:1])]
    return methods


def snapshot_steps(targets: Iterable[int], log_every: int) -> np.ndarray:
    """Each target step rounded up to a logged step (a multiple of log_every), sorted, unique."""
    return np.unique([-(-t // log_every) * log_every for t in targets])


def no_statistic(x: jax.Array) -> jax.Array:
    """The in-scan statistic of a method whose metrics all run on the host: none."""
    return jnp.zeros((), x.dtype)


class MethodRunner:
    """Runs methods for all seeds from x0 [S, d, B] with keys [S] for `steps` outer steps, logging every
    `log_every` steps, into `run_dir`.

    snapshots: the snapshot steps (`snapshot_steps`); statistic(x [d, B]) -> []: a statistic computed
    inside the scan (the mean reward); finite / progress: row fields that must be finite / that the
    progress bar shows."""

    def __init__(self, run_dir: RunDir, x0: jax.Array, keys: jax.Array, steps: int, log_every: int,
                 snapshots: np.ndarray, statistic: Callable = no_statistic, finite: Sequence[str] = (),
                 progress: Sequence[str] = ()):
        self.run_dir, self.x0, self.keys, self.steps, self.log_every = run_dir, x0, keys, steps, log_every
        self.snapshots, self.statistic, self.finite, self.progress = snapshots, statistic, finite, progress

    def run(self, run: Run, methods: Sequence[Method], theta0: Any, recording: Callable[[Any], Recording],
            defined: Callable[[str, dict, Any], None] = lambda name, history, theta_opt: None
            ) -> dict[str, dict[str, np.ndarray]]:
        """Runs `methods` in order as units of `run`, each from θ0 [S, ...] or θ_opt; writes
        methods/<name>.npz. recording(θ_opt, None before it is known) -> what the next method records;
        defined(name, history, θ_opt) once the first trained method `name` has defined θ_opt. Returns
        the arrays of each method."""
        per_method: dict[str, dict[str, np.ndarray]] = {}
        theta_opt = None
        for method in methods:
            if method.start == "theta_opt" and theta_opt is None:
                raise UserError(f"method {method.name} starts from θ_opt: run a trained method before it")
            record = recording(theta_opt)
            state = run.run(self.unit(method, theta0 if method.start == "theta0" else theta_opt, record))
            chains, history = jax.tree.map(np.asarray, (state["chains"], state["history"]))
            if theta_opt is None and method.trains:
                theta_opt = chains.theta
                defined(method.name, history, theta_opt)
            per_method[method.name] = self.arrays(method, chains, history, record.tracks)
            self.run_dir.save_arrays(f"methods/{method.name}.npz", per_method[method.name])
        return per_method

    def unit(self, method: Method, start: Any, recording: Recording) -> Unit:
        """The unit of one method from θ = start [S, ...]."""
        mesh = seed_mesh(len(self.keys))
        keys = shard_leading(self.keys, mesh)
        kept = [track for track in recording.tracks if track.at != "final"]
        example = (np.asarray(self.x0)[None], jax.tree.map(lambda a: np.asarray(a)[None], start))

        def history(steps: int) -> dict:
            """The empty history of a run of `steps` steps."""
            n = {"log": len(logged_steps(steps, self.log_every)), "snapshots": len(self.snapshots)}
            return {t.name: jax.tree.map(lambda a: np.zeros((n[t.at],) + a.shape[1:], a.dtype), t.value(*example))
                    for t in kept}

        def record(h: dict, steps: np.ndarray, x: np.ndarray, theta: Any, statistic: np.ndarray):
            """Keeps the tracks of logged steps [c] and returns their rows."""
            logged = log_index(self.steps, self.log_every, steps)
            shown = np.isin(steps, self.snapshots)
            for t in kept:
                value = t.value(x, theta)
                if t.at == "log":
                    _put(h[t.name], logged, value)
                else:
                    _put(h[t.name], np.searchsorted(self.snapshots, steps[shown]),
                         jax.tree.map(lambda v: v[shown], value))
            values = recording.metrics(steps, x, theta, statistic)
            rows = []
            for i, step in enumerate(steps):
                row = {"T": method.T, "step": int(step), "grad_evals": int(step) * method.T}
                for name, v in values.items():
                    row.update(seed_stats(name, v[i]))
                rows.append(row)
            return h, rows

        def chains() -> LangevinState:
            return shard_leading(jax.vmap(method.init)(self.x0, start), mesh)

        def init():
            return {"chains": chains(), "history": history(self.steps)}

        def template():
            return {"chains": chains(), "history": history(latest_checkpoint(self.run_dir, method.name))}

        def first_rows(state):
            c = state["chains"]
            state["history"], rows = record(state["history"], np.array([0]), np.asarray(c.x)[None],
                                            jax.tree.map(lambda a: np.asarray(a)[None], c.theta),
                                            np.asarray(jax.vmap(self.statistic)(c.x))[None])
            return rows

        def run_steps(state, first, n):
            hist = jax.tree.map(np.array, state["history"])
            hist = jax.tree.map(lambda a, b: grown(a, len(b)), hist, history(self.steps))
            c, logged, x, theta, values = advance(method.update, self.statistic, state["chains"], keys, first, n,
                                                  self.log_every)
            hist, rows = record(hist, logged, x, theta, values)
            return {"chains": c, "history": hist}, rows

        work = self.x0.shape[0] * self.x0.shape[-1] * method.T  # particle-steps per outer step
        return Unit(self.steps, init, advance=run_steps, name=method.name, template=template, first_rows=first_rows,
                    chunk=segments_of(self.steps, self.log_every), finite=self.finite, progress=self.progress,
                    nan_hint="lower --lr or --gamma",
                    rate=lambda seconds, n: f"{work * n / seconds / 1e6:6.1f}M p-steps/s")

    def arrays(self, method: Method, chains: LangevinState, history: dict, tracks: Sequence[Track]
               ) -> dict[str, np.ndarray]:
        """methods/<name>.npz: the logged steps, the snapshot steps shown (those before the last step,
        then the last step), T and the saved tracks."""
        shown = self.snapshots[self.snapshots < self.steps]
        at = np.searchsorted(self.snapshots, shown)
        final = (chains.x[None], jax.tree.map(lambda a: a[None], chains.theta))
        arrays = {"steps": logged_steps(self.steps, self.log_every), "snapshot_steps": np.append(shown, self.steps),
                  "T": np.asarray(method.T)}
        for t in tracks:
            if not t.saved:
                continue
            if t.at == "log":
                value = history[t.name]
            elif t.at == "snapshots":
                value = jax.tree.map(lambda h, f: np.concatenate([h[at], f]), history[t.name], t.value(*final))
            else:
                value = jax.tree.map(lambda f: f[0], t.value(*final))
            arrays.update(npz_entries(value, t.name))
        return arrays


def _put(history: Any, where: np.ndarray, value: Any) -> None:
    """history[where] = value, leaf by leaf (a track may be a pytree)."""
    for h, v in zip(jax.tree.leaves(history), jax.tree.leaves(value)):
        h[where] = v


def grown(array: np.ndarray, length: int) -> np.ndarray:
    """`array` with its leading axis zero-padded to `length` (a history after `--steps` grew)."""
    if len(array) >= length:
        return array
    return np.concatenate([array, np.zeros((length - len(array),) + array.shape[1:], array.dtype)])


def latest_checkpoint(run_dir: RunDir, name: str) -> int:
    """The step of method `name`'s latest checkpoint in `run_dir` (0: none)."""
    with Checkpointer(run_dir.path / "checkpoints" / name) as ckpt:
        return ckpt.latest_step() or 0


def log_index(steps: int, log_every: int, step: np.ndarray) -> np.ndarray:
    """Positions of logged `step`s among `logged_steps(steps, log_every)`."""
    return np.searchsorted(logged_steps(steps, log_every), step)


def seed_stats(name: str, values: np.ndarray) -> dict[str, float]:
    """{name_mean, name_min, name_max} of values [S] over seeds."""
    return {f"{name}_{s}": float(getattr(values, s)()) for s in STATS}


def npz_entries(tree: Any, name: str) -> dict[str, np.ndarray]:
    """An array as the npz entry `name`, a dict pytree (Flax parameters) as `name/<path>` per leaf."""
    if not isinstance(tree, dict):
        return {name: np.asarray(tree)}
    return {f"{name}/{k}": np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def npz_tree(arrays: dict[str, np.ndarray], name: str) -> Any:
    """What `npz_entries` stored as `name`: the array, or the dict pytree of its `name/<path>` entries."""
    if name in arrays:
        return arrays[name]
    leaves = {k[len(name) + 1:]: v for k, v in arrays.items() if k.startswith(name + "/")}
    return traverse_util.unflatten_dict(leaves, sep="/")


def final_metrics(rows: list[dict], names: Sequence[str], since: float) -> dict[str, tuple[dict, dict]]:
    """Per method of metrics rows, in order: (its last row, {metric: [mean of metric_mean, min of
    metric_min, max of metric_max] over its rows of steps ≥ since}) for the metrics of `names` it logs."""
    per_method: dict[str, list[dict]] = {}
    for row in rows:
        per_method.setdefault(row["method"], []).append(row)
    final = {}
    for name, mine in per_method.items():
        window = [row for row in mine if row["step"] >= since]
        final[name] = (mine[-1], {k: [float(np.mean([r[f"{k}_mean"] for r in window])),
                                      min(r[f"{k}_min"] for r in window), max(r[f"{k}_max"] for r in window)]
                                  for k in names if f"{k}_mean" in mine[-1]})
    return final


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table of one row per method on the console: the method's column left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
