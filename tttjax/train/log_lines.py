"""Training log lines that say when and where: absl's prefix plus the process index.

    I1203 16:12:48.280325 p0 tttjax] step 10: loss 0.4123, grad norm 1.204, ...

`line(text)` is what the trainer prints (progress bar, console): absl's own prefix (severity,
date, time with microseconds; `absl.logging.get_absl_log_prefix`) with the thread id
replaced by `p<jax.process_index()>`, so lines gathered from every host of a pod (XPK and
Cloud Logging interleave them) sort by time and name their host. The same text also goes to
the `tttjax` Python logger at INFO, for handlers a user installs (files, Cloud Logging).
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

_LOGGER = logging.getLogger("tttjax")


def _process_index() -> int:
    jax = sys.modules.get("jax")   # no jax import (and no backend start) just to log
    try:
        return jax.process_index() if jax is not None else 0
    except Exception:  # noqa: BLE001 - before the backend exists: the first process
        return 0


def line(text: str, *, level: int = logging.INFO, source: str = "tttjax") -> str:
    """`text` with an absl prefix naming the time and the process; also logged to `tttjax`."""
    record = logging.LogRecord("tttjax", level, source, 0, text, None, None)
    prefix = absl_logging.get_absl_log_prefix(record)
    # absl: "I1203 16:12:48.280325 139624013847424 source:0] "; the thread id says nothing on
    # a pod, the process index does.
    day, clock, _thread, location = prefix.split(" ", 3)
    _LOGGER.log(level, text)
    return f"{day} {clock} p{_process_index()} {location.replace(':0]', ']')}{text}"
