"""One run per workdir: an exclusive lock on `WORKDIR/.lock` for the run's lifetime.

The lock is `fcntl.flock` on an open file, so the operating system releases it when the
process ends in any way (exit, exception, `kill -9`): a crashed run never leaves a stale
lock behind, and the next run takes it over at once. The file holds who took it
(host, pid, start time) for the message a second run prints:

    WORKDIR is in use by another run (host h1, pid 4242, since 2026-12-03 12:00:00 UTC); ...

For a workdir shared by several hosts of one run, process 0 takes the lock (the others are
part of the same run).

A `gs://` workdir has no file locks: its lock is the object `WORKDIR/.lock`, created only if
it does not exist (the upload precondition `ifGenerationMatch=0`, which Cloud Storage checks
atomically, so of two runs starting together exactly one gets it). It holds the same owner
record plus a heartbeat: a thread of the holder rewrites it every `heartbeat_s` seconds (each
rewrite conditional on the generation it last wrote, so a holder notices when its lock was
taken from it) and the object is deleted on release. A run killed without releasing (`kill
-9`, a lost VM) leaves the object behind; it counts as stale once its last write is older
than `stale_after_s` (3 minutes by default), and the next run then takes it over, again
conditionally on the stale generation, so two runs cannot both take over one stale lock. To
break a lock at once (only when the run that holds it is surely gone):

    gcloud storage rm gs://BUCKET/RUN/.lock

Other URL schemes (s3://, ...) are refused with a clear error: no lock is implemented there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Self

from tttjax import storage

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0       # how often the holder of an object-store lock rewrites it
STALE_AFTER_S = 180.0    # an object-store lock not rewritten for this long is taken over


class WorkdirBusy(ValueError):
    """Another run holds the workdir (a usage error: exit code 2)."""


class WorkdirUnusable(ValueError):
    """The workdir is a file, or cannot be created or written (exit code 2)."""


class WorkdirLockLost(RuntimeError):
    """Another run took this run's object-store lock: this run stops writing (exit code 1)."""


def _describe(info) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"]))
        return f"host {info['host']}, pid {info['pid']}, since {since}"
    except (KeyError, TypeError, ValueError, OverflowError):
        return "holder unknown"


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return _describe(json.load(f))
    except (OSError, ValueError):
        return "holder unknown"


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "run": uuid.uuid4().hex}


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock; raises `WorkdirBusy` at once
    (no waiting) when another process or another open of the lock holds it. `workdir` is a
    local folder or a `gs://` URL (see the module doc; the two timings only apply there)."""

    def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.workdir = storage.resolve(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self._object: _ObjectLock | None = None
        self._timing = (heartbeat_s, stale_after_s)

    def acquire(self) -> Self:
        if storage.is_url(self.workdir):
            self._object = _ObjectLock(self.workdir, self.path, *self._timing).acquire()
            return self
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise WorkdirUnusable(f"workdir {self.workdir} is a file, not a folder")
        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkdirUnusable(f"workdir {self.workdir} cannot be written "
                                  f"({err.strerror or err}: {err.filename or self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusy(
                f"{self.workdir} is in use by another run ({_holder(self.path)}); wait for "
                "it to finish or stop it, or give another --workdir") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._object is not None:
            self._object.release()
            self._object = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._object is not None

    @property
    def lost(self) -> str | None:
        """Why an object-store lock was taken from this run (None while it holds it)."""
        return self._object.lost if self._object is not None else None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _ObjectLock:
    """The `gs://` lock object: conditional create, heartbeat, conditional delete."""

    def __init__(self, workdir: str, url: str, heartbeat_s: float, stale_after_s: float):
        if not url.startswith("gs://"):
            raise WorkdirUnusable(
                f"workdir {workdir}: only local folders and gs:// buckets can be locked "
                "against a second run; use one of those")
        self.workdir, self.url = workdir, url
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lost: str | None = None
        self._generation: int | None = None
        self._record = _owner_record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._blob = None

    def _client_blob(self):
        try:
            from google.api_core import exceptions
            from google.cloud import storage as gcs
        except ImportError:
            raise WorkdirUnusable(f"workdir {self.workdir} needs google-cloud-storage: pip "
                                  "install 'tttjax[gcs]'") from None
        bucket, _, name = self.url[len("gs://"):].partition("/")
        client = gcs.Client()
        return exceptions, client.bucket(bucket).blob(name)

    def _write(self, if_generation_match: int) -> None:
        record = dict(self._record, heartbeat=time.time())
        self._blob.upload_from_string(json.dumps(record), content_type="application/json",
                                      if_generation_match=if_generation_match)
        self._generation = self._blob.generation

    def acquire(self) -> Self:
        exceptions, self._blob = self._client_blob()
        if storage.path(self.workdir).is_file():
            raise WorkdirUnusable(f"workdir {self.workdir} is an object, not a folder")
        try:
            try:
                self._write(if_generation_match=0)
            except exceptions.PreconditionFailed:
                self._take_over_if_stale(exceptions)
        except (exceptions.NotFound, exceptions.Forbidden, exceptions.Unauthorized) as err:
            raise WorkdirUnusable(f"workdir {self.workdir} cannot be written "
                                  f"({_first_line(err)})") from None
        self._thread = threading.Thread(target=self._heartbeat, name="tttjax-workdir-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def _take_over_if_stale(self, exceptions) -> None:
        try:
            self._blob.reload()
            generation = self._blob.generation
            info = json.loads(self._blob.download_as_bytes(if_generation_match=generation))
        except exceptions.NotFound:        # released meanwhile: try once more from scratch
            self._write(if_generation_match=0)
            return
        except (exceptions.PreconditionFailed, ValueError):
            info, generation = None, None
        written = self._blob.updated.timestamp() if self._blob.updated else time.time()
        age = time.time() - written
        if generation is None or age < self.stale_after_s:
            raise WorkdirBusy(
                f"{self.workdir} is in use by another run ({_describe(info)}, last heartbeat "
                f"{age:.0f} s ago); wait for it to finish or stop it, or give another "
                f"--workdir (a lock whose run died is taken over {self.stale_after_s:.0f} s "
                f"after its last heartbeat; `gcloud storage rm {self.url}` breaks it now)"
            ) from None
        try:
            self._write(if_generation_match=generation)
        except exceptions.PreconditionFailed:
            raise WorkdirBusy(f"{self.workdir} is in use by another run (it took over the "
                              "stale lock first); give another --workdir") from None
        logging.warning("took over the stale lock %s (%s, last heartbeat %.0f s ago)",
                        self.url, _describe(info), age)

    def _heartbeat(self) -> None:
        exceptions, _ = self._client_blob()
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write(if_generation_match=self._generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                self.lost = (f"the lock {self.url} was deleted or taken over by another run; "
                             "two runs may now write this workdir")
                logging.error("%s", self.lost)
                return
            except Exception as err:  # noqa: BLE001 - transient network errors: retry next beat
                logging.warning("workdir lock heartbeat failed (%s); retrying", _first_line(err))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None or self._generation is None:
            return
        exceptions, _ = self._client_blob()
        try:
            self._blob.delete(if_generation_match=self._generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            pass
        self._generation = None


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
