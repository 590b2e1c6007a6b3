"""Wall time and compiled memory of jitted functions, as every benchmark measures them.

Times are medians over repeated calls after one warm-up call (which compiles if the function
is not compiled yet), each call waited for with `block_until_ready`, so they are device time
plus dispatch, not asynchronous launch time. Memory is XLA's compiled memory analysis of the
executable (arguments + outputs + temporaries - aliased): the peak one device needs, whatever
else the machine is running.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax


def median_time(fn: Callable, args: Sequence, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(compiled) -> float:
    """Bytes one device needs to run `compiled` (a `jax.stages.Compiled`); NaN if unknown."""
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
