"""Subprocess tests: the command line's exit codes, and a 2-process jax.distributed run.

Only what needs separate processes runs in them: the CLI's exit status and one-line error,
and two processes joined by `jax.distributed` over localhost (launch/local_multiprocess.sh).
"""

import importlib.util
import json
import os
import subprocess
import sys


from tttjax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA CPU options that cut compile time several-fold (slower code, same numbers).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False}


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # no 8 fake devices: each process sets its own
    env["JAX_PLATFORMS"] = "cpu"
    return env


CONFIG = """
import importlib.util

_spec = importlib.util.spec_from_file_location("tiny_base", {tiny!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config(arg="none"):
    config = _tiny.get_config(arg)
    config.data.builder_overrides = dict(num_train=64, num_validation=0)
    config.train.compiler_options = {fast!r}
    return config
"""


def _config_file(tmp_path):
    """A config file deriving from configs/tiny.py (dict fields cannot be set by flags)."""
    path = tmp_path / "tiny_small_data.py"
    path.write_text(CONFIG.format(tiny=os.path.join(ROOT, "configs", "tiny.py"), fast=FAST))
    spec = importlib.util.spec_from_file_location("cfg_tiny_mp", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(path), module.get_config()


def test_cli_rejects_invalid_configs_with_one_line_and_exit_code_2(tmp_path):
    workdir = tmp_path / "run"
    cases = [
        (["--config.train.trainable=mixer"], "trains the mixer"),
        (["--config.stepz=3"], "stepz"),
    ]
    for extra, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "tttjax.train", "--config", "configs/tiny.py",
             "--workdir", str(workdir)] + extra,
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("python -m tttjax.train: error:"), lines
        assert message in lines[0]
        assert not (workdir / "checkpoints").exists()


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data_dir = str(tmp_path / "tfds")
    flags = {"steps": 3, "log_every": 1, "train.global_batch_size": 2, "train.progress_bar": False,
             "data.data_dir": data_dir}

    # One process, two devices (in this pytest process).
    config_file, cfg = _config_file(tmp_path)
    cfg.steps, cfg.log_every = 3, 1
    cfg.train.global_batch_size, cfg.train.progress_bar = 2, False
    cfg.data.data_dir = data_dir
    cfg.mesh.num_devices = 2
    single = str(tmp_path / "single")
    train(cfg, single)

    # Two processes, one device each, joined over localhost.
    multi = str(tmp_path / "multi")
    args = [f"--config.{k}={v}" for k, v in flags.items()]
    proc = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "-n", "2", "--cpu-devices", "1", "--",
         sys.executable, "-m", "tttjax.train", "--config", config_file, "--workdir", multi]
        + args,
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0] done: 3 steps" in proc.stdout and "[1] done: 3 steps" in proc.stdout

    def records(workdir):
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    one, two = records(single), records(multi)
    assert [r["step"] for r in two] == [1, 2, 3]
    print("losses, 1 process x 2 devices:", [r["loss"] for r in one],
          "2 processes x 1 device:", [r["loss"] for r in two])
    for a, b in zip(one, two):  # the same SPMD program on the same rows: bitwise equal
        assert (b["loss"], b["grad_norm"]) == (a["loss"], a["grad_norm"]), (a, b)
    # each process wrote its own data-iterator state
    data = os.path.join(multi, "checkpoints", "3", "data")
    assert sorted(os.listdir(data))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not os.path.exists(os.path.join(multi, "tensorboard", "process_1"))

