"""The run directory: resolved config, metrics, arrays and figures, all written atomically.

    runs/<command>-<timestamp>/
      config.json      the fully resolved config
      metrics.jsonl    one JSON object per logged step (and method)
      arrays.npz       trajectories and final samples
      figures/*.png    matplotlib figures
      checkpoints/     orbax checkpoints (long runs)

Whole files are written to a temporary name and renamed (`os.replace` is atomic on POSIX), so an
interrupted run never leaves a half-written file. `metrics.jsonl` grows by appends that are cut back
when they fail; a reader skips a torn last line (a process killed mid-append), and the next run on the
directory drops it (`RunDir.drop_torn_metrics`) before it appends.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from idiff_cli.errors import UserError, first_line

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough for the summary tables, no wrapping
    console.width = 120


_UMASK = os.umask(0)
os.umask(_UMASK)


def default_run_dir(command: str, root: str | os.PathLike = "runs") -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path(root) / f"{command}-{stamp}"


@contextlib.contextmanager
def disk_errors(path: pathlib.Path) -> Iterator[None]:
    """A full disk or quota while writing `path` -> one-line UserError (the files already there are
    kept: every write is a new file renamed into place, or an append that is undone)."""
    try:
        yield
    except Exception as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError) else (
            "No space left on device" in str(e))  # orbax/tensorstore report it as text in a ValueError
        if full:
            raise UserError(f"no space left on the device writing '{path}'; the files written before are "
                            "intact: free some space and re-run the same command to resume") from None
        raise


@contextlib.contextmanager
def atomic_path(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=path.suffix)
    os.close(fd)
    try:
        with disk_errors(path):
            yield pathlib.Path(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, pathlib.Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


DAMAGED = "restore it, or start again in another --out"


def read_json(path: str | os.PathLike, keys: Iterable[str] = (), what: str = DAMAGED) -> Any:
    """The JSON object in `path`, holding `keys`: every file idiff reads back from a run directory
    comes through here. A file that is missing, unreadable, not UTF-8, not JSON, not an object or
    lacking a key is a one-line UserError naming it and `what` to do."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"'{path}' does not exist; {what}") from None
    except IsADirectoryError:
        raise UserError(f"'{path}' is a directory, not a JSON file; {what}") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror}; {what}") from None
    except (UnicodeDecodeError, ValueError) as e:
        reason = first_line(e) or type(e).__name__
        raise UserError(f"'{path}' is damaged (not JSON: {reason}); {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is damaged (a JSON {type(data).__name__}, not an object); {what}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"'{path}' is damaged (no '{missing[0]}'); {what}")
    return data


class RunDir:
    """A run directory; every write is atomic."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def check_writable(self, flag: str = "--out") -> None:
        """A one-line UserError unless the directory exists and can be written, or can be made: its
        nearest existing ancestor is a writable directory. Creates nothing (a check before work)."""
        path = self.path
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                raise UserError(f"{flag} '{path}' is not writable")
            return
        if path.exists() or path.is_symlink():
            raise UserError(f"{flag} '{path}' exists and is not a directory")
        ancestor = path.absolute().parent
        while not ancestor.exists() and not ancestor.is_symlink():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"{flag} '{path}' lies under '{ancestor}', which is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"cannot create {flag} '{path}': '{ancestor}' is not writable")

    def check_new(self, flag: str = "--out") -> None:
        """`check_writable`, and a one-line UserError when the directory exists and is not empty (a
        command that writes a whole directory once: import, export)."""
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise UserError(f"{flag} '{self.path}' exists and is not an empty directory; choose another {flag}")
        self.check_writable(flag)

    def create(self) -> "RunDir":
        """Makes the directory and its missing parents. A path that is a file, lies under a file or
        cannot be made is a one-line UserError, and then nothing is created."""
        path = self.path
        if path.is_dir():
            return self
        self.check_writable()
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create --out '{path}': {e.strerror}") from None
        return self

    def lock(self) -> "RunLock":
        """Takes the directory's run lock (see `RunLock`)."""
        return RunLock(self.path / "run.lock")

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    def write_json(self, name: str, obj: Any) -> pathlib.Path:
        text = json.dumps(obj, indent=2, default=_json_default) + "\n"
        atomic_write_bytes(self.path / name, text.encode())
        return self.path / name

    def read_json(self, name: str, keys: Iterable[str] = ()) -> Any:
        """The JSON object `name` of the run directory, holding `keys` (`read_json`: damage is one line)."""
        return read_json(self.path / name, keys)

    def append_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Appends rows to metrics.jsonl in one write; a failed append is cut back to the rows before
        it, so a full disk never leaves a torn row between complete ones."""
        data = "".join(json.dumps(row, default=_json_default) + "\n" for row in rows).encode()
        self.create()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~_UMASK)
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            with disk_errors(self.metrics_path):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
        finally:
            os.close(fd)

    def reset_metrics(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        """Replaces metrics.jsonl by `rows` (atomically)."""
        text = "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def drop_torn_metrics(self) -> str | None:
        """Rewrites metrics.jsonl without an unterminated last line (an append cut short by a crash, on a
        file system whose appends are not atomic), so that the next append starts a line of its own;
        returns the dropped text, or None when the file ends cleanly."""
        path = self.metrics_path
        if not path.exists() or path.stat().st_size == 0:
            return None
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return None
        text = path.read_text(encoding="utf-8", errors="replace")
        self.reset_metrics(read_metrics(path))
        return text[text.rfind("\n") + 1:]

    def save_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> pathlib.Path:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(self.path / name, buffer.getvalue())
        return self.path / name

    def save_figure(self, fig: Any, name: str) -> pathlib.Path:
        """Saves a matplotlib figure as figures/<name> (PNG) and closes it."""
        return save_figure(fig, self.path / "figures" / name)


class RunLock:
    """An exclusive lock on a run directory, held while a run writes into it: an advisory `flock` on
    `run.lock`, which holds the holder's pid. The kernel drops it when the process ends (killed ones
    too), so a lock is never stale; a second run on the directory is refused naming the holder."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise UserError(f"'{path.parent}' is in use by another run (pid {holder}); wait for it to end "
                            "or pick a new --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()


CACHE_ENV = "IDIFF_CACHE_DIR"


def cache_root() -> pathlib.Path:
    """The machine's cache of what is computed once and read by every later run (the MNIST
    classifiers' weights, datasets' FID statistics): $IDIFF_CACHE_DIR, default ~/.cache/idiff."""
    return pathlib.Path(os.environ.get(CACHE_ENV, "~/.cache/idiff")).expanduser()


@contextlib.contextmanager
def taking_turns(path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive advisory `flock` on `path` (created if absent), waiting for it: processes
    that fill one cache (e.g. the MNIST classifier's) take turns, so the second finds the first's work.
    The kernel drops the lock when its holder ends, killed ones too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save_figure(fig: Any, path: pathlib.Path) -> pathlib.Path:
    """Writes a matplotlib figure to `path` (PNG, atomically) and closes it."""
    import matplotlib.pyplot as plt  # matplotlib loads only where figures are drawn

    with atomic_path(pathlib.Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return pathlib.Path(path)


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; a torn (unterminated) last line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            rows.append(json.loads(line))
    return rows


def progress_bar(*field_names: str):
    """Live progress: a rich bar (steps, rate, elapsed, ETA and named fields) on a terminal, and
    plain log lines every 15 s otherwise (shell scripts, TPU VM logs, CI).

    Tasks carry `rate` (a preformatted throughput string) and every name in `field_names` (e.g. the
    current reward) as fields: `add_task(name, total=N, rate="", reward="-")`, then `update(...)`.
    """
    if not console.is_terminal:
        return LogProgress(field_names)
    extra = [TextColumn(f"{name}={{task.fields[{name}]}}") for name in field_names]
    return Progress(
        TextColumn("[bold]{task.description:<20}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra,
        console=console,
    )


class LogProgress:
    """The `Progress` calls used here, printed as one line per task every `every` seconds and at the end."""

    def __init__(self, field_names, every: float = 15.0):
        self.field_names, self.every, self.tasks = field_names, every, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int, **fields) -> int:
        now = time.monotonic()
        self.tasks.append({"description": description, "total": total, "completed": 0, "start": now,
                           "printed": now, **fields})
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: int | None = None, **fields) -> None:
        task = self.tasks[task_id]
        task.update(fields)
        if completed is not None:
            task["completed"] = completed
        now = time.monotonic()
        if now - task["printed"] < self.every and task["completed"] < task["total"]:
            return
        task["printed"] = now
        done, total = task["completed"], task["total"]
        elapsed = now - task["start"]
        eta = elapsed * (total - done) / done if done else float("nan")
        extra = " ".join(f"{name}={task[name]}" for name in self.field_names)
        console.print(f"{task['description']}: {done}/{total} {task['rate']} elapsed {elapsed:.0f}s "
                      f"eta {eta:.0f}s {extra}", soft_wrap=True, highlight=False)
