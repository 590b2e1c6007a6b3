"""TensorBoard event files on object stores, for tensorboardX's `SummaryWriter`.

tensorboardX writes `gs://` logdirs with its own google-cloud-storage writer, which uploads
the whole event file on every flush, again from `__del__` after it was closed (at garbage
collection or interpreter exit: a redundant upload, or a two-minute retry loop when the
store is gone by then, as a test's emulator is). `use_epath_for_object_stores()` replaces
that writer, for `gs://` and `s3://`, with one that uploads through `etils.epath` on each
flush only when something was written since the last upload, and never after `close`.
"""

from __future__ import annotations

import io

from tttjax import storage


class _EpathRecordWriter:
    """The byte stream of one event file, uploaded whole (objects cannot be appended to)."""

    def __init__(self, url: str):
        self._path = storage.path(url)
        self._buffer = io.BytesIO()
        self._dirty = False
        self._closed = False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty and not self._closed:
            self._path.write_bytes(self._buffer.getvalue())
            self._dirty = False

    def close(self) -> None:
        self.flush()
        self._closed = True


class _EpathRecordWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        del path   # object stores need no folders before objects are written


def use_epath_for_object_stores() -> None:
    """Makes tensorboardX write `gs://` and `s3://` logdirs through `_EpathRecordWriter`."""
    from tensorboardX import record_writer

    for scheme in ("gs", "s3"):
        record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())
