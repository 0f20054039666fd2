"""The run loop of every long command (pretrain, finetune, ebm-train, langevin-reward).

A command describes its work as one or more `Unit`s (a whole pretrain or finetune run; one method
of langevin-reward or ebm-train) built from pure pieces — `init() -> state` and either a jitted
`step(state, i) -> (state, output)` that the loop dispatches (`dispatch`) or `advance(state, step,
n) -> (state, rows)`, a jitted chunk of n steps — and `Run` owns everything around them:

* the run directory, claimed on entering the run (`with Run(...)`): `claim` validates nothing itself
  (the command has, before entering), writes `config.json`, and resumes when the *defining* options
  match the stored ones; otherwise one line names the differing options. Run-time options (cadences,
  devices, `--steps`) may change between runs;
* resume: the latest orbax checkpoint of each unit, its metrics rows after that step dropped, so
  a resumed run logs exactly what the uninterrupted run logs (wall-clock fields aside);
* chunks of steps between events (log, hooks, checkpoint, end), one host sync per chunk;
* hooks every N steps (sample grids, FID), the non-finite guard, progress and the `wall_s` column;
* checkpoints every `ckpt_every` steps and at the end, `on_checkpoint` for the files that point at
  them (pretrained.json, finetuned.json);
* SIGTERM / SIGINT (signals.py): the run stops at the next step boundary (`dispatch` checks between
  steps; a jitted chunk at its end), writes a checkpoint there and exits with 143 / 130 and the
  command that resumes. The outputs of a chunk cut short travel in the checkpoint's metadata and the
  resumed run completes the chunk with them, so its rows (a mean over the chunk's steps, say) are the
  uninterrupted run's;
* one run per directory at a time (the run lock), `--out` checked before anything is created.

`dispatch` is the one host loop of jitted steps, used by the units and by the commands without a run
directory (sample, evaluate-fid): one asynchronous dispatch per step, at most `sharding.AHEAD` steps
ahead of the devices, and the stop rule. Multi-process runs: every process takes part in checkpoints
and in the decision to stop, made collectively every `AHEAD` steps and at every chunk's end, so every
process stops after the same step; only process 0 takes the lock, writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from idiff_cli import config as cfglib
from idiff_cli import signals, storage, tracking
from idiff_cli.checkpoint import Checkpointer
from idiff_cli.errors import UserError
from idiff_cli.runs import RunDir, console, progress_bar
from idiff_cli.sharding import AHEAD, keep_ahead

Rows = list[dict[str, Any]]
# Test hook: with IDIFF_TEST_KILL_AFTER_ROWS=N (or N:TERM, N:INT) the process sends itself SIGKILL (or
# SIGTERM, SIGINT) once N metrics rows were logged in this run (by process 0; every process counts them):
# a deterministic kill point.
KILL_HOOK = "IDIFF_TEST_KILL_AFTER_ROWS"
# Test hook: with IDIFF_TEST_SIGNAL_AT_STEP=S (or S:INT, S:KILL) the process sends itself SIGTERM (or that
# signal) once `dispatch` has dispatched step S: a deterministic signal inside a chunk.
SIGNAL_HOOK = "IDIFF_TEST_SIGNAL_AT_STEP"


class Image(NamedTuple):
    """An image in a metrics row (a PNG a hook wrote): shown by the trackers, not written to
    metrics.jsonl."""

    path: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(state, step) -> dict | None` at every multiple of `every` (0: never) and, with `at_end`,
    at the last step; a returned dict is merged into that step's metrics row (`Image` values go to
    the trackers instead)."""

    every: int
    fn: Callable[[Any, int], Mapping[str, Any] | None]
    at_end: bool = True


@dataclasses.dataclass(frozen=True)
class Unit:
    """One resumable unit of work.

    init:      () -> state at step 0 (a pytree of arrays; jax or numpy leaves).
    step:      (state, i) -> (state after step i + 1, output): one jitted step, dispatched by the loop
               (`dispatch`; it may stop early on a signal); `rows(start, outputs, seconds)` turns the
               outputs of the steps start + 1 .. start + len(outputs) into their metrics rows.
    advance:   instead of `step`: (state, step, n) -> (state after step + n, rows), a jitted chunk
               of n steps; rows are the metrics of the logged steps in (step, step + n], each with
               its "step".
    template:  () -> a restore template shaped and placed like the state (default: `init`; give a
               cheaper one when init does real work).
    first_rows: state -> the rows of step 0 (e.g. the initial reward); written on a fresh start.
    chunk:     steps per chunk: it ends at the next multiple of `chunk` (or an earlier event).
    finite:    row fields that must be finite: the run stops with one line naming the step and the
               field, and keeps its last good checkpoint.
    """

    steps: int
    init: Callable[[], Any]
    step: Callable[[Any, int], tuple[Any, Any]] | None = None
    rows: Callable[[int, list, float], Rows] = lambda start, outputs, seconds: []
    advance: Callable[[Any, int, int], tuple[Any, Rows]] | None = None
    name: str | None = None
    template: Callable[[], Any] | None = None
    first_rows: Callable[[Any], Rows] = lambda state: []
    hooks: Sequence[Hook] = ()
    chunk: int = 1
    finite: Sequence[str] = ()
    nan_hint: str = ""
    progress: Sequence[str] = ()  # row fields shown beside the progress bar
    on_checkpoint: Callable[[Any, int, bool], None] = lambda state, step, final: None
    rate: Callable[[float, int], str] = lambda seconds, n: f"{n / seconds:.2f} steps/s"

    def __post_init__(self):
        if (self.step is None) == (self.advance is None):
            raise ValueError("a Unit has either a `step` or an `advance`")


class Run:
    """A claimed run directory and the loop over its units (see the module docstring)."""

    def __init__(self, schema: cfglib.Schema, cfg: Any, run_dir: RunDir, ckpt_every: int, keep: int = 2,
                 is_main: bool = True):
        self.schema, self.cfg, self.dir = schema, cfg, run_dir
        self.ckpt_every, self.keep, self.is_main = ckpt_every, keep, is_main
        self._lock = self._progress = self._signals = self._stop = None
        self._rows_written = self._last_step = 0
        self._made_dir = False
        self._pending = Pending()

    def __enter__(self) -> "Run":
        """Claims the run directory (created, locked, config.json written or checked), then installs the
        signal handlers and the progress display."""
        if self.is_main and self.dir.remote:
            self.dir.check_writable()  # a bucket that does not exist: one line, before it is listed
        self._made_dir = self.is_main and not (storage.objects(self.dir.path) if self.dir.remote else
                                               self.dir.path.exists())
        lock_file = self.dir.path / "run.lock"
        made_lock = not lock_file.exists()
        self._lock = self.dir.create().lock() if self.is_main else None
        try:
            claim(self.schema, self.cfg, self.dir, self.is_main)
        except BaseException:  # a refused claim leaves the directory as it found it
            self._release()
            if self.is_main and made_lock:
                lock_file.unlink(missing_ok=True)
            self._remove_if_unused()
            raise
        self._signals = signals.graceful_stop()
        self._stop = self._signals.__enter__()
        self._progress = (progress_bar("metric") if self.is_main else _Silent()).__enter__()
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        self._progress.__exit__(exc_type, *exc)
        self._signals.__exit__(exc_type, *exc)
        self._release()
        if exc_type is not None and not issubclass(exc_type, signals.Interrupted):
            self._remove_if_unused()
        return False

    def _remove_if_unused(self) -> None:
        """Removes the run directory this run made when the run fails before it wrote a row or a
        checkpoint (an error at start-up leaves nothing behind)."""
        if not self._made_dir or self._rows_written:
            return
        if self.dir.remote:
            if not any(part.isdigit() for name in storage.objects(self.dir.path / "checkpoints")
                       for part in name.split("/")):
                storage.remove_tree(self.dir.path)
            return
        if not any(p.name.isdigit() for p in (self.dir.path / "checkpoints").rglob("*")):
            shutil.rmtree(self.dir.path, ignore_errors=True)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def print(self, text: str) -> None:
        if self.is_main:
            console.print(text, highlight=False)

    def checkpoints(self, unit: Unit) -> Checkpointer:
        path = self.dir.path / "checkpoints"
        return Checkpointer(path / unit.name if unit.name else path, keep=self.keep)

    def run(self, unit: Unit) -> Any:
        """Runs `unit` to `unit.steps` from its latest checkpoint (or from `init`); returns the final state."""
        with self.checkpoints(unit) as ckpt:
            state, step, restored, elapsed = self._start(unit, ckpt)
            trackers = self._trackers(unit.name, restored)
            try:
                if restored is None:
                    self._append(unit, [{**row, "wall_s": 0.0} for row in unit.first_rows(state)], trackers)
                task = self._progress.add_task(unit.name or self.schema.command, total=unit.steps, completed=step,
                                               rate="", metric="-")
                while step < unit.steps:
                    t0 = time.perf_counter()
                    state, rows, n = self._advance(unit, state, step)
                    seconds = time.perf_counter() - t0
                    for row in rows:
                        row["wall_s"] = elapsed + seconds * (row["step"] - step) / n
                    elapsed += seconds
                    step += n
                    self._stop.armed = True  # a chunk is done: from now on a signal saves it
                    if self._lock is not None:
                        self._lock.check()
                    self._guard(unit, rows, ckpt, trackers)
                    rows = self._run_hooks(unit, state, step, rows, elapsed)
                    self._append(unit, rows, trackers)
                    shown = " ".join(f"{k} {rows[-1][k]:.4g}" for k in unit.progress if rows and k in rows[-1])
                    self._progress.update(task, completed=step, rate=unit.rate(seconds, n), metric=shown or "-")
                    stopping = self._stopping()
                    if stopping or step == unit.steps or (self.ckpt_every and step % self.ckpt_every == 0):
                        ckpt.save(step, state, self._pending.meta())
                        ckpt.wait()
                        unit.on_checkpoint(state, step, step == unit.steps)
                    if stopping:
                        raise self._stop.interrupted(self._resume_message(unit, step))
            finally:
                trackers.close()
            if restored == unit.steps:  # a finished unit: the files that point at its checkpoint again
                unit.on_checkpoint(state, step, True)
        self._last_step = max(self._last_step, step)
        return state

    def _start(self, unit: Unit, ckpt: Checkpointer) -> tuple[Any, int, int | None, float]:
        """(state, step, restored step or None, wall seconds so far): from the latest intact checkpoint
        (this unit's rows after it dropped), or from `init`."""
        found = ckpt.restore_latest(unit.template or unit.init)
        self._drop_torn_row(unit, found[0] if found else -1)
        if found is None:
            self._keep_rows(unit, -1)
            return unit.init(), 0, None, 0.0
        step, state, meta = found
        self._pending = Pending.of(meta)
        if step > unit.steps:
            raise UserError(f"the run in '{self.dir.path}' is at step {step}"
                            f"{f' ({unit.name})' if unit.name else ''}; --steps must be at least that")
        rows = self._keep_rows(unit, step)
        self.print(f"resuming{f' {unit.name}' if unit.name else ''} from checkpoint step {step}")
        return state, step, step, rows[-1].get("wall_s", 0.0) if rows else 0.0

    def _advance(self, unit: Unit, state: Any, step: int) -> tuple[Any, Rows, int]:
        """One chunk up to the next event: (state, rows, steps done — fewer when a signal cut it)."""
        n = self._next_event(unit, step) - step
        if unit.advance is not None:
            state, rows = unit.advance(state, step, n)
            return state, rows, n
        t0 = time.perf_counter()
        state, outputs = dispatch(unit.step, state, step, n)
        pending, seconds = self._pending, time.perf_counter() - t0
        if len(outputs) < n:  # cut short by a signal: its rows wait for the rest of the chunk
            self._pending = Pending(pending.start if pending.outputs else step, pending.outputs + host(outputs),
                                    pending.seconds + seconds)
            return state, [], len(outputs)
        self._pending = Pending()
        start = pending.start if pending.outputs else step
        return state, unit.rows(start, pending.outputs + outputs, pending.seconds + seconds), len(outputs)

    def _run_hooks(self, unit: Unit, state: Any, step: int, rows: Rows, elapsed: float) -> Rows:
        """The hooks due at `step`: their values join the row of `step`."""
        extra = {}
        for hook in unit.hooks:
            if (hook.every and step % hook.every == 0) or (hook.at_end and step == unit.steps):
                extra.update(hook.fn(state, step) or {})
        if extra:
            if not rows or rows[-1]["step"] != step:
                rows.append({"step": step, "wall_s": elapsed})
            rows[-1].update(extra)
        return rows

    def _trackers(self, unit: str | None, restored: int | None) -> tracking.Trackers:
        tensorboard, wandb = getattr(self.cfg, "tensorboard", False), getattr(self.cfg, "wandb", "")
        if not self.is_main or not (tensorboard or wandb):
            return tracking.Trackers([])
        return tracking.open_trackers(self.dir.path, unit, tensorboard, wandb, cfglib.to_dict(self.cfg), restored)

    def _next_event(self, unit: Unit, step: int) -> int:
        """The next multiple of the chunk, a hook's or the checkpoint cadence, or the end."""
        cadences = [c for c in (unit.chunk, self.ckpt_every, *(h.every for h in unit.hooks)) if c]
        return min([unit.steps] + [(step // c + 1) * c for c in cadences])

    def _stopping(self) -> bool:
        """Whether a signal asked the run to stop, agreed by every process (they stop at one step)."""
        return agreed(self._stop.requested)

    def _resume_message(self, unit: Unit, step: int) -> str:
        name = signal.Signals(self._stop.signum or signal.SIGTERM).name
        where = f" of {unit.name}" if unit.name else ""
        text = f"stopped by {name} at step {step}{where}; checkpoint saved in {self.dir.path}"
        if os.path.basename(sys.argv[0]) == "idiff":
            args = sys.argv[1:] + ([] if "--out" in sys.argv else ["--out", str(self.dir.path)])
            return f"{text}. Resume: idiff {shlex.join(args)}"
        return f"{text}. Resume: re-run the same command with --out {self.dir.path}"

    def _drop_torn_row(self, unit: Unit, resumed_from: int) -> None:
        """Drops a torn last row of metrics.jsonl (the first unit to start finds it), saying so in one
        line: a row of this unit after the checkpoint it resumes from is logged again; one at or before
        it (its file system lost an append that had returned) is named as lost."""
        torn = self.dir.drop_torn_metrics() if self.is_main else None
        if torn is None:
            return
        step = re.search(r'"step": (\d+)[,}]', torn)
        mine = unit.name is None or f'"method": {json.dumps(unit.name)}' in torn
        what = ("; the step it held cannot be read" if step is None else "" if not mine else
                f"; the row of step {step.group(1)} is lost (the run resumes after it)"
                if int(step.group(1)) <= resumed_from else "; its step is logged again")
        self.print(f"metrics.jsonl ended in a torn row (a write cut short): dropped it{what}")

    def _keep_rows(self, unit: Unit, upto: int) -> Rows:
        """Drops this unit's rows after step `upto` (logged after its last checkpoint); returns its rows kept."""
        mine = lambda r: r.get("method") == unit.name if unit.name else True  # noqa: E731
        keep = lambda r: not mine(r) or r["step"] <= upto  # noqa: E731
        kept = self.dir.keep_metrics(keep) if self.is_main else [r for r in self.dir.read_metrics() if keep(r)]
        return [r for r in kept if mine(r)]

    def _append(self, unit: Unit, rows: Rows, trackers: tracking.Trackers) -> None:
        """Writes rows to metrics.jsonl and the trackers; `Image` values go to the trackers only."""
        for row in rows:
            for tag, value in list(row.items()):
                if isinstance(value, Image):
                    trackers.image(tag, row["step"], value.path)
                    del row[tag]
        trackers.rows(rows)
        if unit.name:
            rows = [{"method": unit.name, **r} for r in rows]
        if self.is_main and rows:
            self.dir.append_metrics(rows)
        self._rows_written += len(rows)
        count, _, name = os.environ.get(KILL_HOOK, "").partition(":")
        if count and self._rows_written >= int(count) > self._rows_written - len(rows):
            os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))

    def _guard(self, unit: Unit, rows: Rows, ckpt: Checkpointer, trackers: tracking.Trackers) -> None:
        """UserError at the first row with a non-finite watched field, after writing the chunk's rows
        before it; the message names the checkpoint a re-run resumes from, or says there is none."""
        for i, row in enumerate(rows):
            for name in unit.finite:
                value = row.get(name)
                if value is not None and not np.all(np.isfinite(value)):
                    self._append(unit, rows[:i], trackers)
                    where = f" ({unit.name})" if unit.name else ""
                    latest = ckpt.latest_step()
                    kept = (f"checkpoint {latest} is kept" if latest is not None else
                            "no checkpoint was saved before it")
                    raise UserError(f"{name} is {value} at step {row['step']}{where}; {kept}"
                                    + (f": {unit.nan_hint}" if unit.nan_hint else ""))

    def done(self, outputs: str, headline: str = "") -> None:
        """The closing line (`headline`, then where the outputs are); the run's figures (figures/*.png)
        go to the trackers."""
        trackers = self._trackers(None, self._last_step)
        for path in sorted((self.dir.path / "figures").glob("*.png")):
            trackers.image(f"figures/{path.stem}", self._last_step, path)
        trackers.close()
        self.print(f"done: {headline + '; ' if headline else ''}outputs in {self.dir.path}/ ({outputs})")


@dataclasses.dataclass(frozen=True)
class Pending:
    """The host values of the outputs of a chunk cut short by a signal (steps start + 1 ..), and the
    seconds they took: saved with the checkpoint (`meta`) and prepended to the resumed chunk's."""

    start: int = 0
    outputs: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def meta(self) -> dict[str, Any]:
        return {"pending": {"start": self.start, "outputs": self.outputs, "seconds": self.seconds}} if self.outputs else {}

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> "Pending":
        pending = meta.get("pending") or {}
        return cls(int(pending.get("start", 0)), list(pending.get("outputs", [])), float(pending.get("seconds", 0.0)))


def host(outputs: list) -> list:
    """Step outputs as JSON values (nested lists of numbers), which `Unit.rows` reads like the arrays."""
    return [jax.tree.map(lambda x: np.asarray(x).tolist(), jax.device_get(o)) for o in outputs]


def agreed(requested: bool) -> bool:
    """Whether any process of the run was asked to stop: every process gets the same answer (a
    collective in a multi-process run; call it at the same step on every process)."""
    if jax.process_count() == 1:
        return requested
    return bool(np.any(multihost_utils.process_allgather(np.asarray(requested))))


def dispatch(step: Callable[[Any, int], tuple[Any, Any]], state: Any, start: int, n: int) -> tuple[Any, list]:
    """Runs `step(state, i)` for i = start .. start + n − 1: one asynchronous dispatch each, at most
    `AHEAD` steps ahead of the devices (the outputs are not read here). Returns (state, the outputs of
    the steps done).

    Stops early, at a step boundary, when a signal asks the work in this process to stop
    (`signals.graceful_stop`, installed by `Run` or `interruptible`): after any step in a
    single-process run; in a multi-process run at the steps where every process decides it together
    (every `AHEAD` steps from `start`), so that all of them stop after the same step. The first step
    dispatched (its program compiled) arms the handlers: a signal before it ends the process."""
    outputs = []
    at, _, name = os.environ.get(SIGNAL_HOOK, "").partition(":")
    for i in range(start, start + n):
        state, output = step(state, i)
        outputs.append(output)
        keep_ahead(outputs)
        signals.arm()
        if at and int(at) == i + 1:
            os.kill(os.getpid(), getattr(signal, f"SIG{name or 'TERM'}"))
        done = len(outputs)
        if jax.process_count() == 1 and signals.requested():
            break
        if jax.process_count() > 1 and done % AHEAD == 0 and done < n and agreed(signals.requested()):
            break
    return state, outputs


@contextlib.contextmanager
def interruptible(stopped: Callable[[int], str]) -> Iterator[Callable]:
    """For a command without a run directory (sample, evaluate-fid): yields `dispatch` under signal
    handlers; a dispatch cut short by a signal raises `Interrupted` with the message `stopped(steps
    done)` (exit status 128 + the signal's number)."""
    with signals.graceful_stop() as stop:

        def run(step, state, start, n):
            state, outputs = dispatch(step, state, start, n)
            if len(outputs) < n:
                raise stop.interrupted(stopped(start + len(outputs)))
            return state, outputs

        yield run


def claim(schema: cfglib.Schema, cfg: Any, run_dir: RunDir, is_main: bool = True) -> None:
    """Writes `config.json` into `run_dir` (a resumed run: with its run-time options updated).

    A directory holding a run whose defining options differ is refused with one line naming them;
    run-time options are taken from `cfg`. A directory with checkpoints or metrics but no config.json
    is refused: the options they were made with are unknown."""
    if not (run_dir.path / "config.json").exists():
        traces = (["checkpoints"] if (run_dir.path / "checkpoints").exists() else []) + (
            ["metrics.jsonl"] if run_dir.has_metrics() else [])
        if traces:
            raise UserError(f"'{run_dir.path}' holds {traces[0]} but no config.json, so the options of that run are "
                            "unknown; restore its config.json to resume, or pick a new --out")
    else:
        stored = run_dir.read_json("config.json")
        if stored.get("command", schema.command) != schema.command:
            raise UserError(f"'{run_dir.path}' holds an `idiff {stored['command']}` run, not {schema.command}; "
                            "pick a new --out")
        changed = cfglib.differences(schema, stored, cfg)
        if changed:
            raise UserError(f"'{run_dir.path}' holds a run with other defining options ({'; '.join(changed)}); "
                            "pick a new --out, or repeat them to resume")
    if is_main:
        run_dir.write_json("config.json", {"command": schema.command, **cfglib.to_dict(cfg)})


def read_config(schema: cfglib.Schema, run_dir) -> Any:
    """The config stored in a run directory of `schema`'s command."""
    path = RunDir(run_dir).path / "config.json"
    if not path.exists():
        raise UserError(f"'{run_dir}' holds no run (no config.json)")
    return schema.from_json(RunDir(run_dir).read_json("config.json"), str(path))


def logged_steps(steps: int, every: int) -> np.ndarray:
    """0, every, 2·every, …, and `steps` (the logged steps of a unit)."""
    return np.unique(np.minimum(np.arange(0, steps + every, every), steps))


def segments_of(steps: int, every: int, max_segments: int = 25) -> int:
    """A chunk size (a multiple of `every`) that runs `steps` in at most ~`max_segments` dispatches."""
    return every * max(1, math.ceil(steps // every / max_segments))


class _Silent:
    """The progress calls, doing nothing (processes other than 0)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass
