"""`tttjax.distributed`: when a run is multi-process, and clear errors when the env is incomplete."""

import pytest

from tttjax import distributed


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"TTTJAX_NUM_PROCESSES": "1"}, False),
    ({"TTTJAX_NUM_PROCESSES": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}, True),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, False),
    ({"TTTJAX_DISTRIBUTED": "auto"}, True),
])
def test_wants_distributed(env, expected):
    assert distributed.wants_distributed(env) is expected


def test_single_process_is_a_no_op(monkeypatch):
    for name in ("TTTJAX_NUM_PROCESSES", "TTTJAX_DISTRIBUTED", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize_from_env() == (0, 1)


@pytest.mark.parametrize("env,match", [
    ({"TTTJAX_NUM_PROCESSES": "2", "TTTJAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"TTTJAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "TTTJAX_PROCESS_ID"),
    ({"TTTJAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "TTTJAX_PROCESS_ID": "5"}, r"\[0, 2\)"),
    ({"TTTJAX_NUM_PROCESSES": "two"}, "must be an integer"),
])
def test_incomplete_environment_is_a_clear_error(monkeypatch, env, match):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("TTTJAX_PROCESS_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(distributed.DistributedConfigError, match=match):
        distributed.initialize_from_env()
