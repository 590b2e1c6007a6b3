"""One run per workdir: an exclusive lock on `WORKDIR/.lock` for the run's lifetime.

The lock is `fcntl.flock` on an open file, so the operating system releases it when the
process ends in any way (exit, exception, `kill -9`): a crashed run never leaves a stale
lock behind, and the next run takes it over at once. The file holds who took it
(host, pid, start time) for the message a second run prints:

    WORKDIR is in use by another run (host h1, pid 4242, since 2026-12-03 12:00:00 UTC); ...

Only local (POSIX) folders are supported; for a workdir shared by several hosts of one run,
process 0 takes the lock (the others are part of the same run). Object-store workdirs
(gs://...) are not locked by this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Self

LOCK_FILE = ".lock"


class WorkdirBusy(ValueError):
    """Another run holds the workdir (a usage error: exit code 2)."""


class WorkdirUnusable(ValueError):
    """The workdir is a file, or cannot be created or written (exit code 2)."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"]))
        return f"host {info['host']}, pid {info['pid']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock; raises `WorkdirBusy` at once
    (no waiting) when another process or another open of the lock holds it."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> Self:
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
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
