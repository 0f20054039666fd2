"""Checkpoints of long runs with orbax: save every N steps, keep the last k, restore the latest intact one.

    ckpt = Checkpointer(run_dir.path / "checkpoints", keep=3)
    ckpt.save(step, state, meta={"data_position": 1234})   # state: any pytree of arrays (keys included)
    ckpt.wait()                                             # on disk, with its manifest
    template = restore_template(jax.eval_shape(make_state))  # zeros shaped like the state, not computed
    step, state, meta = ckpt.restore_latest(lambda: template)  # the newest intact step, or None
    ckpt.close()

orbax writes each step into a temporary directory and renames it when complete (on an object store,
where there are no renames, it writes `commit_success.txt` last). It keeps no checksums, so once a
step is on disk a manifest (`idiff_manifest.json`: each file's size and SHA-256; on an object store
each object's size and the CRC32C the store computed, so nothing is read back) is written into it last: a step without a manifest was cut short, a step whose files disagree with
its manifest was damaged afterwards. Only steps with a manifest count (`all_steps`); `restore_latest`
checks the newest against its manifest, moves a damaged one aside into `damaged/` with a warning and
falls back to the previous one (or to the start when no step was completed); when completed steps
exist but none is intact, it is a one-line UserError. On an object store a step is set aside by
server-side copies into `damaged/`, then deletes (storage.move_tree). Typed JAX PRNG keys are
stored as their key data and re-wrapped on restore, so a state may carry `jax.random.key(...)` leaves.

Test hook: with IDIFF_TEST_KILL_AT_CHECKPOINT=N in the environment, the process kills itself (SIGKILL)
when step N is on disk but its manifest is not yet written: a run killed during a checkpoint write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from idiff_cli import storage
from idiff_cli.errors import UserError
from idiff_cli.runs import atomic_write_bytes, console, disk_errors

MANIFEST = "idiff_manifest.json"
PARTIAL = "*.orbax-checkpoint-tmp*"  # orbax's directory of a step being written


class _NoOrbaxLogs(logging.Filter):
    """Keeps orbax's own log records (absl's logger: hundreds of lines and tracebacks from its writer
    threads when a disk fills) out of the terminal; its failures reach the caller as exceptions, which
    become one line (runs.disk_errors) or a traceback of their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


logging.getLogger("absl").addFilter(_NoOrbaxLogs())


def _late_write_completions(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A sys.unraisablehook that drops one report and passes on every other: when a write fails (a
    full disk), the step's other writes may complete after orbax has closed its event loop, and
    tensorstore reports posting their results to it as an unraisable RuntimeError of no object. The
    step is discarded either way; the failure itself reaches the caller as an exception."""

    def hook(unraisable: Any) -> None:
        if not (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    return hook


sys.unraisablehook = _late_write_completions(sys.unraisablehook)

KILL_HOOK = "IDIFF_TEST_KILL_AT_CHECKPOINT"
CUT_SHORT = "no manifest: the write was cut short"


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _from_storable(tree: Any, template: Any) -> Any:
    return jax.tree.map(lambda leaf, like: jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
                        if _is_key(like) else leaf, tree, template)


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings when the leaves have them) of the storable form of `tree`."""

    def leaf_spec(x):
        x = np.asarray(x) if not isinstance(x, (jax.Array, np.ndarray)) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf_spec, _to_storable(tree))


def restore_template(abstract: Any) -> Any:
    """A concrete restore template for an abstract state (`jax.eval_shape`'s output): zeros, and PRNG
    keys of the default implementation, so that restoring costs no computation of the state."""

    def leaf(spec):
        if jax.dtypes.issubdtype(spec.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, spec)
            return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype))
        return jnp.zeros(spec.shape, spec.dtype)

    return jax.tree.map(leaf, abstract)


class Checkpointer:
    """Orbax CheckpointManager over `directory`: a pytree `state` plus a JSON `meta` per step, each
    complete step with its manifest (see the module docstring)."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3):
        directory = storage.path(directory)
        self.remote = storage.is_remote(directory)
        self.directory = directory if self.remote else directory.absolute()
        self.keep = keep
        self._pending: list[int] = []
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """The steps written completely (with a manifest), oldest first."""
        return sorted(s for s in self._manager.all_steps() if (self._step_dir(s) / MANIFEST).exists())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> None:
        """Saves `state` (and `meta`) as step `step`; returns once the save is started (async)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_storable(state)),
                                  meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
        with self._writing():
            self._manager.save(int(step), args=args, force=True)
        self._pending.append(int(step))

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state and meta of `step` (default: the latest), shaped and placed like `template`; a
        step that disagrees with its manifest is a UserError."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        problem = self.damage(step)
        if problem:
            raise UserError(f"checkpoint {self._step_dir(step)} is damaged ({problem})")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(int(step), args=args)
        return _from_storable(restored["state"], template), dict(restored["meta"])

    def restore_latest(self, template: Callable[[], Any]) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest intact step, or None when no step was completed;
        `template()` (structure and placement of the state) is built only when there is a step.

        Steps cut short (no manifest) or damaged are moved into `damaged/` with a warning, so that
        the run continues from the intact one; when completed steps exist but none is intact:
        UserError."""
        damaged, cut, like = [], [], None
        for step in sorted(self._manager.all_steps(), reverse=True):
            problem = self.damage(step)
            if problem is None:
                try:
                    like = template() if like is None else like
                    state, meta = self.restore(like, step)
                except Exception as e:  # noqa: BLE001 - orbax's many ways of failing on bad bytes
                    problem = f"orbax cannot read it: {type(e).__name__}: {str(e)[:200]}"
                else:
                    self._set_aside(damaged + cut)
                    return step, state, meta
            console.print(f"warning: checkpoint {self._step_dir(step)} is not usable ({problem}); trying "
                          "the one before", highlight=False)
            (cut if problem == CUT_SHORT else damaged).append(step)
        self._set_aside(damaged + cut)
        if damaged:
            raise UserError(f"no intact checkpoint in {self.directory} (steps {', '.join(map(str, damaged))} "
                            f"moved to {self.directory / 'damaged'}); pick a new --out to start again")
        return None

    def damage(self, step: int) -> str | None:
        """What is wrong with step `step` on disk (None: its files match its manifest)."""
        root = self._step_dir(step)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            return CUT_SHORT
        except ValueError:
            return "its manifest is garbled"
        if manifest.get("digest") == "crc32c":
            return _crc32c_damage(manifest["files"], storage.objects(root))
        for name, (size, digest) in manifest["files"].items():
            path = root / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, not {size}"
            if _sha256(path) != digest:
                return f"{name} does not match its checksum"
        return None

    def wait(self) -> None:
        """Blocks until pending saves are on disk, then writes their manifests (process 0)."""
        with self._writing():
            self._manager.wait_until_finished()
            for step in self._pending:
                if os.environ.get(KILL_HOOK) == str(step):
                    os.kill(os.getpid(), signal.SIGKILL)
                root = self._step_dir(step)
                if jax.process_index() == 0 and root.is_dir():  # a step removed by keep= needs none
                    atomic_write_bytes(root / MANIFEST, json.dumps(self._manifest(step, root)).encode())
        self._pending = []

    def _manifest(self, step: int, root: pathlib.Path) -> dict[str, Any]:
        """Each file's size and SHA-256; on an object store each object's size and stored CRC32C."""
        if self.remote:
            files = {name: list(entry) for name, entry in sorted(storage.objects(root).items()) if name != MANIFEST}
            return {"step": step, "digest": "crc32c", "files": files}
        files = {str(p.relative_to(root)): [p.stat().st_size, _sha256(p)]
                 for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
        return {"step": step, "files": files}

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A full disk while writing a step: one line (runs.disk_errors), and the step's partial
        directory removed, so that the space it took is free again for the re-run."""
        try:
            with disk_errors(self.directory):
                yield
        except UserError:
            with contextlib.suppress(Exception):  # its writer threads failed already; end them
                self._manager.close()
            if jax.process_index() == 0 and not self.remote:  # orbax writes no temporary directory there
                for partial in self.directory.glob(PARTIAL):
                    shutil.rmtree(partial, ignore_errors=True)
            self._pending = []
            self._manager = self._open()
            raise

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(int(step))

    def _set_aside(self, steps: list[int]) -> None:
        """Moves steps into `damaged/` (kept for inspection) and reopens the manager without them."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / "damaged" / str(step)
                if self.remote:
                    storage.remove_tree(target)
                    storage.move_tree(self._step_dir(step), target)
                    continue
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(exist_ok=True)
                os.replace(self._step_dir(step), target)
        self._manager.close()
        self._manager = self._open()


def _crc32c_damage(files: dict[str, list], stored: dict[str, tuple[int, str]]) -> str | None:
    """What differs between a manifest's objects (size, CRC32C) and those stored (None: nothing)."""
    for name, (size, crc) in files.items():
        if name not in stored:
            return f"{name} is missing"
        if stored[name][0] != size:
            return f"{name} has {stored[name][0]} bytes, not {size}"
        if stored[name][1] != crc:
            return f"{name} does not match its CRC32C"
    return None


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
