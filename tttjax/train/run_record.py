"""A record of what ran: software versions, devices, processes, mesh and code commit.

    record = run_record.collect(mesh)
    {"versions": {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8", "optax": ...,
                  "orbax-checkpoint": ..., "libtpu": ... or absent},
     "platform": "tpu", "platform_version": "<the backend's own version string: libtpu build
     on TPU, CUDA / driver on GPU>", "cuda_version": ... (GPU only),
     "device_kind": "TPU v5p", "device_count": 256, "local_device_count": 4,
     "process_count": 64, "num_slices": 2, "mesh": {"data": 8, "fsdp": 8, "tensor": 4},
     "git_commit": "3ef299d..." or None, "git_dirty": False or None, "python": "3.12.3",
     "started": "2026-12-03T16:10:00Z"}

`train` writes it to WORKDIR/run.json (process 0, at each start: a resumed run overwrites it
with the software it resumed on) and into every checkpoint's meta (`meta["run"]`), so a
checkpoint says what produced it. It is not put inside config.json: that file is read back
as the run's config (sampling, resumption checks), and a record of the environment is not a
setting.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import jax

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "libtpu", "libtpu-nightly",
             "jax-cuda12-plugin", "jax-cuda12-pjrt", "grain", "tensorflow-datasets")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding `path` (default: this package); (None,
    None) when it is not one (an installed wheel, a container without git)."""
    here = path or os.path.dirname(os.path.abspath(__file__))
    commit = _git(["rev-parse", "HEAD"], here)
    if commit is None:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no"], here)
    return commit, (bool(status) if status is not None else None)


def _cuda_version() -> str | None:
    try:
        from jax._src.lib import cuda_versions  # the CUDA plugin's own report, when present
    except ImportError:
        return None
    if cuda_versions is None:
        return None
    try:
        return str(cuda_versions.cuda_runtime_get_version())
    except Exception:  # noqa: BLE001 - a plugin without a GPU present raises its own errors
        return None


def collect(mesh: Any = None) -> dict[str, Any]:
    """The run record of this process's JAX backend (and `mesh`, a `jax.sharding.Mesh`)."""
    devices = jax.devices()
    from jax.extend import backend as jax_backend

    platform_version = getattr(jax_backend.get_backend(), "platform_version", None)
    commit, dirty = git_state()
    record = {
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
        "python": platform.python_version(),
        "platform": devices[0].platform,
        "platform_version": platform_version,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "num_slices": len({getattr(d, "slice_index", 0) or 0 for d in devices}),
        "mesh": {k: int(v) for k, v in mesh.shape.items()} if mesh is not None else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if devices[0].platform == "gpu":
        record["cuda_version"] = _cuda_version()
    return record
