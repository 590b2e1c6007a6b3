"""Model folders on object storage (`gs://...`) read through a temporary local copy.

The readers of Hugging Face folders (`safetensors.safe_open` memory-maps its file,
SentencePiece opens `spiece.model` by name) need local files. A command given a `gs://`
model folder copies it to a temporary folder first, reads it there, and deletes the copy:

    with local_folder("gs://b/CogVideoX-5b", subfolders=("vae",)) as folder:
        model, cfg = from_diffusers_vae(folder)      # folder: /tmp/tttjax-gs-.../CogVideoX-5b

A local path is yielded unchanged (nothing is copied). `subfolders` limits what of a pipeline
folder is copied (its `vae/` only, not the 9 GB text encoder next to it). Files are streamed
(16 MiB at a time), never held whole in memory; all access goes through `tttjax.storage`
(etils.epath: gcsfs for gs://).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from tttjax import storage

_CHUNK = 16 << 20


def download_tree(url: str, local: str, *, subfolders: Sequence[str] | None = None) -> int:
    """Copies the files of the object-store folder `url` into the local folder `local`.

    Every file directly in `url` is copied, and of its subfolders those named in
    `subfolders` (all when None), recursively. Returns the
    number of files copied. Raises FileNotFoundError when `url` is not a folder.
    """
    root = storage.path(url)
    if not root.is_dir():
        raise FileNotFoundError(f"{url!r} is not a folder (no object under it)")
    count = 0
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        target = os.path.join(local, entry.name)
        if entry.is_dir():
            if subfolders is None or entry.name in subfolders:
                count += download_tree(os.fspath(entry), target, subfolders=None)
            continue
        os.makedirs(local, exist_ok=True)
        with entry.open("rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        count += 1
    return count


@contextlib.contextmanager
def local_folder(path: str | None, *, subfolders: Sequence[str] | None = None
                 ) -> Iterator[str | None]:
    """Yields `path` itself when local (or None), else a temporary local copy of the URL
    (see `download_tree` for `subfolders`), deleted when the block ends. The copy
    keeps the folder's own name (`.../CogVideoX-5b`), so messages naming it stay readable."""
    if path is None or not storage.is_url(path):
        yield path
        return
    url = storage.resolve(path)
    with tempfile.TemporaryDirectory(prefix="tttjax-gs-") as scratch:
        local = os.path.join(scratch, url.rsplit("/", 1)[-1] or "folder")
        download_tree(url, local, subfolders=subfolders)
        yield local
