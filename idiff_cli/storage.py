"""Where a run directory lives: a local path, or a prefix of Cloud Storage objects (`gs://bucket/run`).

    path("runs/m")          -> pathlib.Path   (POSIX: atomic renames, flock, appends)
    path("gs://bucket/m")   -> epath.Path     (orbax's path type, over gcsfs)

What holds on an object store, where there are no renames, locks or appends:

* an object is written whole in one upload or not at all (`write_bytes`), so a file of a run
  directory is never torn;
* the run lock is an object created only when absent (`ifGenerationMatch=0`) that holds a lease
  (`Lease`): renewed by a heartbeat, taken over once it expired, said in one line;
* `objects` lists a prefix with each object's size and stored CRC32C (no byte is read), and
  `move_tree` moves a prefix by server-side copies, then deletes.

Clients: files through `etils.epath` (gcsfs, the client orbax writes its metadata with), so that
idiff's writes and orbax's share one listing cache; the lease through google-cloud-storage, which has
generation preconditions on updates. `use_emulator` points every client, tensorstore (orbax's array
writer) included, at `STORAGE_EMULATOR_HOST` when only that is set.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import threading
import time
from typing import Any

from idiff_cli.errors import UserError, first_line

SCHEME = "gs://"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
LEASE_ENV = "IDIFF_LOCK_LEASE_S"
LEASE_S = 60.0  # a killed run's lock is taken over this long after its last heartbeat

# gcsfs logs each failed request of its retries with a traceback; the failure itself reaches the caller
# as an exception, which idiff turns into one line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names objects in Cloud Storage (gs://)."""
    return os.fspath(path).startswith(SCHEME)


def path(text: str | os.PathLike) -> pathlib.Path:
    """The path type for `text`: `epath.Path` for gs://bucket/..., `pathlib.Path` otherwise. A gs://
    path without a bucket is a one-line UserError."""
    if isinstance(text, pathlib.Path) or not is_remote(text):
        return pathlib.Path(text)
    bucket = os.fspath(text)[len(SCHEME):].split("/", 1)[0]
    if not bucket:
        raise UserError(f"'{os.fspath(text)}' names no bucket; write gs://BUCKET/PATH")
    use_emulator()
    from etils import epath  # gcsfs, fsspec and google-auth load only for gs:// paths

    return epath.Path(os.fspath(text).rstrip("/"))


def use_emulator(environ: dict[str, str] = os.environ) -> None:
    """With `STORAGE_EMULATOR_HOST` set (a local GCS emulator), points the clients that do not read it
    at the same server, before they start: tensorstore (`TENSORSTORE_GCS_HTTP_URL` and a test token,
    which it reads instead of Google credentials) and gcsfs, whose bucket-layout probe needs a gRPC
    control API that emulators lack (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: plain buckets). Values
    already set are kept."""
    host = environ.get(EMULATOR_ENV)
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _split(p: Any) -> tuple[str, str]:
    """(bucket, object name) of a gs:// path."""
    bucket, _, name = os.fspath(p)[len(SCHEME):].partition("/")
    return bucket, name


def _fs(p: Any):
    """The gcsfs file system behind epath's gs:// paths (the same instance, hence one listing cache)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(p))


def write_bytes(p: Any, data: bytes) -> None:
    """Writes the object `p` whole (one upload: it exists complete or not at all)."""
    path(p).write_bytes(data)


def upload(local: pathlib.Path, p: Any) -> None:
    """Copies the local file `local` to the object `p` (one upload)."""
    _fs(p).put_file(os.fspath(local), os.fspath(p))


def objects(prefix: Any) -> dict[str, tuple[int, str]]:
    """{name relative to `prefix`: (size, base64 CRC32C)} of every object under `prefix`, from one
    fresh listing (the CRC32C is the one Cloud Storage stored; nothing is downloaded)."""
    fs, root = _fs(prefix), os.fspath(prefix)[len(SCHEME):].rstrip("/")
    fs.invalidate_cache()  # every cached listing: one under `prefix` may predate another client's writes
    found = fs.find(root, detail=True)
    return {name[len(root) + 1:]: (int(info["size"]), info.get("crc32c", ""))
            for name, info in found.items() if info.get("type") == "file"}


def move_tree(src: Any, dst: Any) -> None:
    """Moves every object under `src` to the same name under `dst`: server-side copies first, then the
    deletes, so that an interrupted move leaves every object in at least one place."""
    fs, names = _fs(src), sorted(objects(src))
    for name in names:
        fs.copy(f"{os.fspath(src)}/{name}", f"{os.fspath(dst)}/{name}")
    fs.rm([f"{os.fspath(src)}/{name}" for name in names])
    fs.invalidate_cache()


def remove_tree(p: Any) -> None:
    """Deletes every object under `p` (none: nothing happens)."""
    names = sorted(objects(p))
    if names:
        _fs(p).rm([f"{os.fspath(p)}/{name}" for name in names])
        _fs(p).invalidate_cache()


def check_prefix(p: Any, flag: str) -> None:
    """A one-line UserError unless `p`'s bucket can be reached and exists and `p` is not an object itself
    (a file): a run directory to write or to read. The right to write is not probed: a refusal comes
    at the first write, as one line."""
    bucket, name = _split(p)
    try:
        found = _fs(p).exists(bucket)
        is_file = bool(name) and _fs(p).isfile(os.fspath(p))
    except Exception as e:  # noqa: BLE001 - no network, no credentials: each client has its own errors
        raise UserError(f"cannot reach {flag} '{p}': {type(e).__name__}: {first_line(e)}") from None
    if not found:
        raise UserError(f"{flag} '{p}': bucket '{bucket}' does not exist; create it "
                        f"(gcloud storage buckets create gs://{bucket}) or pick another")
    if is_file:
        raise UserError(f"{flag} '{p}' exists and is not a directory")


def _bucket_client():
    from google.cloud import storage as gcs  # the lease's client: generation preconditions on updates

    return gcs.Client()


class Lease:
    """The run lock of a run directory on an object store (the object `run.lock`).

    Taken by creating the object only when absent (`ifGenerationMatch=0`); it holds the owner (host
    and pid) and the lease's end. A heartbeat thread renews it every third of the lease with
    `ifGenerationMatch` = the generation this process wrote last, so a renewal never overwrites
    another run's lock. A lock whose lease ended (its run was killed, its VM preempted) is taken over
    with `ifGenerationMatch` = its generation — of two runs taking it over at once, one wins — and
    that is said in one line. A lock renewed by someone else (this run's lease ran out while it
    stalled) is `lost`: `check` then refuses to go on."""

    def __init__(self, p: Any, lease_s: float | None = None, say=print):
        from google.api_core import exceptions as gexc

        self.path, self._gexc = p, gexc
        self.lease_s = float(lease_s or os.environ.get(LEASE_ENV) or LEASE_S)
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"
        bucket, name = _split(p)
        self._blob = _bucket_client().bucket(bucket).blob(name)
        self.lost = False
        try:
            self._write(0)
        except gexc.PreconditionFailed:
            self._take_over(say)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="idiff-lease", daemon=True)
        self._thread.start()

    def _write(self, generation: int) -> None:
        body = {"owner": self.owner, "lease_s": self.lease_s, "expires": time.time() + self.lease_s}
        self._blob.upload_from_string(json.dumps(body) + "\n", content_type="application/json",
                                      if_generation_match=generation)
        self.generation = self._blob.generation

    def _take_over(self, say) -> None:
        """The lock exists: refused while its lease runs; taken over (one line) once it ended."""
        held = self._blob.bucket.get_blob(self._blob.name)
        where = os.fspath(self.path).rsplit("/", 1)[0]
        if held is None:  # released meanwhile: claimed like a fresh one, or refused if another run was quicker
            try:
                return self._write(0)
            except self._gexc.PreconditionFailed:
                raise UserError(f"'{where}' was claimed by another run at the same moment; pick a new --out") from None
        try:
            info = json.loads(held.download_as_bytes())
            owner, expires = str(info["owner"]), float(info["expires"])
        except (ValueError, KeyError, TypeError):
            owner, expires = "unknown (an unreadable lock)", 0.0
        left = expires - time.time()
        if left > 0:
            raise UserError(f"'{where}' is in use by another run ({owner}; its lease ends in {left:.0f} s unless "
                            "renewed); wait for it to end or pick a new --out")
        try:
            self._write(held.generation)
        except self._gexc.PreconditionFailed:
            raise UserError(f"'{where}' was claimed by another run at the same moment; pick a new --out") from None
        say(f"took over the run lock of {where} from {owner}, whose lease ended {-left:.0f} s ago (a killed run "
            "or a preempted VM)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._write(self.generation)
            except self._gexc.PreconditionFailed:
                self.lost = True
                return
            except Exception:  # noqa: BLE001 - a network error: the next beat tries again within the lease
                continue

    def check(self) -> None:
        """A one-line UserError when another run took this run's lock over."""
        if self.lost:
            raise UserError(f"lost the run lock of {os.fspath(self.path).rsplit('/', 1)[0]}: this run stalled past "
                            "its lease and another run took the directory over; this run stops")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock, if it is still this run's generation."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if not self.lost:
            try:
                self._blob.delete(if_generation_match=self.generation)
            except (self._gexc.NotFound, self._gexc.PreconditionFailed):
                pass
