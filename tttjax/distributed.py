"""Multi-process start-up shared by every entry point and every launcher in `launch/`.

`initialize_from_env()` calls `jax.distributed.initialize` exactly when the environment
says the run spans several processes:

- explicit (local launcher, SLURM wrapper, any cluster): `JAX_COORDINATOR_ADDRESS=host:port`,
  `TTTJAX_NUM_PROCESSES`, `TTTJAX_PROCESS_ID`, optional `JAX_LOCAL_DEVICE_IDS=0,1,...`;
- detected by JAX itself: Cloud TPU VM pods / GKE TPU slices (`TPU_WORKER_HOSTNAMES` with
  more than one host), SLURM jobs with several tasks (`SLURM_NTASKS` > 1), or
  `TTTJAX_DISTRIBUTED=auto` to force JAX's own cluster detection.

A single process does nothing, so the same command runs on a laptop and on a pod.
"""

from __future__ import annotations

import os

import jax


class DistributedConfigError(ValueError):
    """The environment asks for a multi-process run but is incomplete or inconsistent."""


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedConfigError(f"{name} must be an integer, got {raw!r}") from None


def wants_distributed(environ=None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("TTTJAX_DISTRIBUTED", "").lower() in ("auto", "1", "true"):
        return True
    if env.get("TTTJAX_NUM_PROCESSES") not in (None, "", "1"):
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return env.get("SLURM_NTASKS") not in (None, "", "1") and "SLURM_JOB_ID" in env


def initialize_from_env() -> tuple[int, int]:
    """Initialises `jax.distributed` when the environment asks for it.

    Returns:
      (process_index, process_count) after initialisation (0, 1 for a single process).
    Raises:
      DistributedConfigError naming the missing or bad variable.
    """
    if not wants_distributed():
        return 0, 1
    num = _int_env("TTTJAX_NUM_PROCESSES")
    pid = _int_env("TTTJAX_PROCESS_ID")
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num is not None and num > 1:
        missing = [n for n, v in (("JAX_COORDINATOR_ADDRESS", coordinator),
                                  ("TTTJAX_PROCESS_ID", pid)) if v is None]
        if missing:
            raise DistributedConfigError(
                f"TTTJAX_NUM_PROCESSES={num} but {', '.join(missing)} is not set; "
                "set it (launch/local_multiprocess.sh does) or unset TTTJAX_NUM_PROCESSES")
        if not 0 <= pid < num:
            raise DistributedConfigError(
                f"TTTJAX_PROCESS_ID={pid} must be in [0, {num}) for TTTJAX_NUM_PROCESSES={num}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    else:
        # Cloud TPU / GKE / SLURM: JAX reads its own cluster environment.
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()
