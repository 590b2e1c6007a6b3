"""The persistent XLA compilation cache: a restarted run loads its compiled step from disk.

    with compile_cache.persistent(compile_cache.directory(config, workdir)):
        ...   # every jit compile in here is looked up in, and written to, the cache

`config.compile_cache_dir`: "" (default) caches under WORKDIR/compile_cache, so a restart
or a preempted job resumed on the same workdir (a gs:// bucket included: JAX reads and
writes the cache through etils.epath) finds its programs; a path shares one cache between
runs (e.g. ~/.cache/tttjax/xla for experiments on one machine); "none" turns it off.

JAX's defaults only cache programs that took over a second to compile and are not tiny;
inside `persistent` both thresholds are 0, so the tiny config's programs are cached too (a
5B step is cached either way). The cache key covers the program, the devices and the
compiler version, so a stale entry is never used for another setup. The previous settings
are restored on exit, so one process can run several trainings (tests, notebooks) without
leaking the cache setting into later compiles.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
from etils import epath

_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


def directory(config, workdir: str) -> str | None:
    """The cache folder of a run: config.compile_cache_dir, "" -> WORKDIR/compile_cache,
    "none" -> None (off)."""
    value = config.get("compile_cache_dir", "") or ""
    if value.lower() == "none":
        return None
    if value:
        path = epath.Path(value).expanduser()
    else:
        local = "://" not in workdir     # a relative local workdir: its absolute path
        path = epath.Path(os.path.abspath(workdir) if local else workdir) / "compile_cache"
    return str(path)


@contextlib.contextmanager
def persistent(cache_dir: str | None) -> Iterator[str | None]:
    """Compiles inside use (and fill) the persistent cache at `cache_dir` (None: no change)."""
    if cache_dir is None:
        yield None
        return
    from jax.experimental.compilation_cache import compilation_cache

    epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    before = {name: getattr(jax.config, name) for name in _SETTINGS}
    # The cache object is made once per process from the settings of the first compile;
    # reset it so that the folder set here is the one used (and again on the way out).
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield cache_dir
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
