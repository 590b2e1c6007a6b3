"""Paths that are local folders or object-store URLs (`gs://bucket/run`), through `etils.epath`.

Every command that reads or writes a workdir, checkpoint or data folder takes either kind:

    storage.resolve("run")            -> "/home/me/run"   (local: absolute, as before)
    storage.resolve("gs://b/run/")    -> "gs://b/run"     (URL: kept, never made absolute)
    storage.path("gs://b/run") / "config.json"   an epath.Path (fsspec/gcsfs for gs://)

Object stores have no folders and no rename: a "folder" exists when an object lies under it,
one object write is atomic, and moving a tree is copy + delete. The helpers here keep the
local behaviour exactly (temporary file, fsync, `os.replace`) and do the object-store
equivalent for URLs. `gs://` needs the `gcs` extra (gcsfs, google-cloud-storage).
"""

from __future__ import annotations

import os
import re
import shutil
import time

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), False for local ones."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """A local path made absolute, or a URL as given without trailing slashes."""
    path = os.fspath(path)
    if is_url(path):
        return path.rstrip("/")
    return os.path.abspath(path)


def path(p: str | os.PathLike) -> epath.Path:
    """`resolve(p)` as an `epath.Path` (os calls for local paths, fsspec for URLs)."""
    return epath.Path(resolve(p))


def write_text_atomic(p: str | os.PathLike, text: str) -> None:
    """Writes `text` to `p` so that no reader ever sees a partial file: locally through a
    temporary file, flushed to disk and renamed; on an object store as one object write
    (an upload is atomic: the object appears whole or not at all)."""
    if is_url(p):
        path(p).write_text(text)
        return
    target = os.fspath(p)
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves the folder `src` to `dst` (which must not exist): a rename locally, a copy of
    every object then deletion of the originals on an object store."""
    if not is_url(src):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(resolve(src))
    _, target = fsspec.core.url_to_fs(resolve(dst))
    files = fs.find(root)
    for name in files:
        fs.copy(name, target + name[len(root):])
    fs.rm(files)


class TextAppender:
    """Appends text to the file `p`, created if missing.

    Locally an open file in append mode, flushed after every write (readers see each line
    at once). An object cannot be appended to, so for a URL the whole text is held here and
    the object rewritten after a write when `upload_every_s` have passed since the last
    upload, and on `flush` / `close`: a crash loses at most that many seconds of lines.
    """

    def __init__(self, p: str | os.PathLike, *, upload_every_s: float = 30.0):
        self._url = is_url(p)
        self._path = path(p)
        self._every = upload_every_s
        if self._url:
            self._text = self._path.read_text() if self._path.exists() else ""
            self._uploaded_at = -float("inf")
            self._dirty = False
        else:
            self._file = open(self._path, "a", encoding="utf-8")   # noqa: SIM115 - closed in close()

    def write(self, text: str) -> None:
        if not self._url:
            self._file.write(text)
            self._file.flush()
            return
        self._text += text
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self._every:
            self.flush()

    def flush(self) -> None:
        if not self._url:
            self._file.flush()
        elif self._dirty:
            self._path.write_text(self._text)
            self._uploaded_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self._url:
            self.flush()
        else:
            self._file.close()


def upload_tree(local: str | os.PathLike, url: str, *, last: tuple[str, ...] = ()) -> None:
    """Copies every file under the local folder `local` to the same relative name under
    `url` (a folder or a URL); files whose name is in `last` go after all the others (e.g. the
    marker a reader checks for, so that it never sees a half-uploaded folder)."""
    local = os.fspath(local)
    files = sorted(os.path.relpath(os.path.join(root, name), local)
                   for root, _, names in os.walk(local) for name in names)
    files.sort(key=lambda rel: os.path.basename(rel) in last)
    for rel in files:
        target = path(url) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(local, rel), "rb") as f:
            target.write_bytes(f.read())
