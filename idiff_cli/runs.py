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

On an object store (`gs://`, storage.py) each file is one object written whole, and the metrics are
chunk objects `metrics/<n>.jsonl`, one per append, read back in the order of n: the same rows, the
same rule for a torn last line (of any chunk), no object rewritten when rows are added.
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
from typing import Any, Callable, Iterable, Iterator, Mapping

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

from idiff_cli import storage
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
    """Yields a temporary path next to `path`; renames it onto `path` if the block succeeds. For an
    object (gs://) the temporary file is local and uploaded whole onto `path`."""
    if storage.is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix="idiff-", suffix=path.suffix)
        os.close(fd)
        try:
            yield pathlib.Path(tmp)
            storage.upload(pathlib.Path(tmp), path)
        finally:
            os.remove(tmp)
        return
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
    path = storage.path(path)
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
        self.path = storage.path(path)
        self.remote = storage.is_remote(self.path)
        self._next_chunk: int | None = None

    def check_writable(self, flag: str = "--out") -> None:
        """A one-line UserError unless the directory exists and can be written, or can be made: its
        nearest existing ancestor is a writable directory. Creates nothing (a check before work). On an
        object store: the bucket exists and the path is not an object (storage.check_prefix)."""
        path = self.path
        if self.remote:
            return storage.check_prefix(path, flag)
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
        if self.remote:
            self.check_writable(flag)
            if storage.objects(self.path):
                raise UserError(f"{flag} '{self.path}' exists and is not an empty directory; choose another {flag}")
            return
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise UserError(f"{flag} '{self.path}' exists and is not an empty directory; choose another {flag}")
        self.check_writable(flag)

    def create(self) -> "RunDir":
        """Makes the directory and its missing parents. A path that is a file, lies under a file or
        cannot be made is a one-line UserError, and then nothing is created. An object store has no
        directories: the prefix is only checked."""
        path = self.path
        if self.remote:
            self.check_writable()
            return self
        if path.is_dir():
            return self
        self.check_writable()
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create --out '{path}': {e.strerror}") from None
        return self

    def lock(self) -> "RunLock | storage.Lease":
        """Takes the directory's run lock (`RunLock`; on an object store `storage.Lease`)."""
        if self.remote:
            return storage.Lease(self.path / "run.lock", say=lambda text: console.print(text, highlight=False))
        return RunLock(self.path / "run.lock")

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    def has_metrics(self) -> bool:
        return bool(self._chunks()) if self.remote else self.metrics_path.exists()

    def _chunks(self) -> list[pathlib.Path]:
        """The metrics chunk objects, in the order of their rows (object stores)."""
        names = sorted(n for n in storage.objects(self.path / "metrics") if n.endswith(".jsonl") and "/" not in n)
        return [self.path / "metrics" / n for n in names]

    def _append_chunk(self, data: bytes) -> None:
        """One new chunk object after the last one (object stores: nothing is rewritten)."""
        if self._next_chunk is None:
            chunks = self._chunks()
            self._next_chunk = int(chunks[-1].stem) + 1 if chunks else 0
        target = self.path / "metrics" / f"{self._next_chunk:09d}.jsonl"
        with disk_errors(target):
            storage.write_bytes(target, data)
        self._next_chunk += 1

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
        if self.remote:
            return self._append_chunk(data)
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
        """Replaces metrics.jsonl by `rows` (atomically; a local run directory: on an object store
        rows are edited chunk by chunk, `edit_metrics`)."""
        assert not self.remote, "an object store's metrics are edited by edit_metrics"
        text = "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def keep_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Drops the rows for which `keep` is false; returns the rows kept (`edit_metrics`)."""
        return self.edit_metrics(lambda row: row if keep(row) else None)

    def edit_metrics(self, edit: Callable[[dict[str, Any]], dict[str, Any] | None]) -> list[dict[str, Any]]:
        """Replaces every row by `edit(row)` (a new dict; None drops the row) and returns the rows kept.
        On an object store each chunk is rewritten on its own (or deleted when emptied), only when its
        rows changed: a run killed halfway leaves every chunk either edited or as it was, and the same
        edit applied again finishes the work (an edit that is idempotent)."""
        if not self.remote:
            rows = self.read_metrics()
            edited = [e for e in map(edit, rows) if e is not None]
            if edited != rows:
                self.reset_metrics(edited)
            return edited
        out = []
        for chunk in self._chunks():
            rows = _parse_rows(chunk.read_text(encoding="utf-8"))
            edited = [e for e in map(edit, rows) if e is not None]
            if not edited:
                chunk.unlink(missing_ok=True)
            elif edited != rows:
                storage.write_bytes(chunk, "".join(json.dumps(r, default=_json_default) + "\n" for r in edited).encode())
            out += edited
        return out

    def read_metrics(self) -> list[dict[str, Any]]:
        if self.remote:
            return [row for chunk in self._chunks() for row in _parse_rows(chunk.read_text(encoding="utf-8"))]
        return read_metrics(self.metrics_path)

    def drop_torn_metrics(self) -> str | None:
        """Rewrites metrics.jsonl without an unterminated last line (an append cut short by a crash, on a
        file system whose appends are not atomic), so that the next append starts a line of its own;
        returns the dropped text, or None when the file ends cleanly. On an object store, every chunk
        object ending in a torn line (damaged: an object is written whole) is rewritten without it."""
        if self.remote:
            torn = None
            for chunk in self._chunks():
                text = chunk.read_bytes().decode("utf-8", errors="replace")
                if text and not text.endswith("\n"):
                    torn = text[text.rfind("\n") + 1:]
                    storage.write_bytes(chunk, text[:text.rfind("\n") + 1].encode())
            return torn
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

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of `name` (an .npz that `save_arrays` wrote), read whole (a file or an object)."""
        with np.load(io.BytesIO((self.path / name).read_bytes()), allow_pickle=False) as npz:
            return dict(npz)

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

    def check(self) -> None:
        """Nothing to check: the kernel keeps the flock for as long as this process lives."""

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

    path = storage.path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file; a torn (unterminated) last line is skipped."""
    if not path.exists():
        return []
    return _parse_rows(path.read_text(encoding="utf-8"))


def _parse_rows(text: str) -> list[dict[str, Any]]:
    """The rows of metrics text (a file, or one chunk object); a torn (unterminated) last line is skipped."""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n") and line.strip()]


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
