"""Integrity of saved checkpoints: a checksum manifest per step, and finiteness checks.

Every step `WORKDIR/checkpoints/<step>/` written by `tttjax.train.checkpoints.Checkpointer`
holds `integrity.json`: the size and SHA-256 of every file of the step, recorded after Orbax
has written and finalised the items but before it commits the step (Orbax's
`post_finalization_callback`, run in its background save thread; the manifest is inside the
temporary step folder that Orbax then renames into place, so a committed step always
carries its manifest). Orbax's own step bookkeeping at the top of the step
(`_CHECKPOINT_METADATA`, `commit_success.txt`), which it rewrites while committing, is not
listed.

`verify_step(step_dir)` re-reads every listed file and reports the first problem in a few
words ("params/ocdbt.process_0/d/ab12...: 412 bytes, manifest says 8231"), or None when the
step is intact. A step without a manifest (saved before manifests existed, or by a process
killed between Orbax's commit and the synchronous-mode manifest write) can only be checked
by restoring it, which callers do.

Step folders may be local or on an object store (`gs://...`, through `etils.epath`): there
the manifest is one object write, and Orbax writes the step in place (no temporary folder)
and marks it committed after this callback.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
from etils import epath
import jax.numpy as jnp
import numpy as np

from tttjax import storage

MANIFEST = "integrity.json"
_FORMAT = 1
# Written or rewritten by Orbax while committing the step, after the manifest.
_UNTRACKED_TOP = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST})


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _without_scheme(path) -> str:
    # fsspec's walk yields "bucket/dir" for "gs://bucket/dir"
    text = os.fspath(path)
    return (text.split("://", 1)[1] if "://" in text else text).rstrip("/")


def _files(step_dir: epath.Path) -> list[str]:
    """'/'-joined paths relative to `step_dir` of every file under it, sorted."""
    out = []
    top = _without_scheme(step_dir)
    for root, dirs, files in step_dir.walk():
        dirs.sort()
        sub = _without_scheme(root)[len(top):].strip("/")
        for name in sorted(files):
            rel = f"{sub}/{name}" if sub else name
            if rel not in _UNTRACKED_TOP:
                out.append(rel)
    return out


def write_manifest(step_dir: str) -> dict:
    """Records size and SHA-256 of every file under `step_dir` in `step_dir/integrity.json`
    (written to a temporary name, flushed to disk and renamed)."""
    root = storage.path(step_dir)
    files = {}
    for rel in _files(root):
        path = root / rel
        files[rel] = {"size": path.stat().length, "sha256": _sha256(path)}
    manifest = {"format": _FORMAT, "algorithm": "sha256", "files": files}
    storage.write_text_atomic(os.path.join(storage.resolve(step_dir), MANIFEST),
                              json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def has_manifest(step_dir: str) -> bool:
    return (storage.path(step_dir) / MANIFEST).is_file()


def verify_step(step_dir: str) -> str | None:
    """None if every file of the manifest is present with its size and checksum, otherwise a
    few words naming the first problem. A step without a manifest also gives None: callers
    check `has_manifest` and verify such a step by restoring it (see the module doc)."""
    root = storage.path(step_dir)
    if not root.is_dir():
        return "missing"
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for rel, want in sorted(files.items()):
        full = root / rel
        if not full.is_file():
            return f"{rel}: missing"
        size = full.stat().length
        if size != want.get("size"):
            return f"{rel}: {size} bytes, manifest says {want.get('size')}"
        if _sha256(full) != want.get("sha256"):
            return f"{rel}: SHA-256 differs from the manifest"
    return None


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return jnp.stack(leaves) if leaves else jnp.ones((0,), bool)


def nonfinite_leaves(tree: Any) -> list[str]:
    """'/'-joined paths of the floating-point leaves of `tree` holding a NaN or infinity."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [p for p, x in flat if _is_float(x)]
    if not paths:
        return []
    flags = np.asarray(jax.device_get(_all_finite([x for _, x in flat if _is_float(x)])))
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                     for k in path) for path, ok in zip(paths, flags) if not ok]
