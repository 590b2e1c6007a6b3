"""Launch scripts: syntax, dry-run commands, and early clear failures."""

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def run(script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                          text=True, env=full_env, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_tpu_vm_pod_dry_run():
    """--setup ships a wheel of this checkout (never a public URL) through the bucket and
    installs it with the tested pins; a local config file travels with it."""
    out = run("tpu_vm_pod.sh", "--tpu", "pod", "--zone", "us-central2-b", "--config",
              "configs/cogvideox_5b.py:3s,ttt_mlp", "--workdir", "gs://b/run", "--setup",
              "--dry-run", "--", "--config.steps=10")
    assert out.returncode == 0, out.stderr
    root = str(LAUNCH.parent)
    assert "pip wheel -q --no-deps -w " in out.stderr and out.stderr.strip().endswith(root)
    upload, install, train = out.stdout.splitlines()
    assert upload.startswith("+ gcloud storage cp ") and upload.endswith("gs://b/run/code/")
    assert f"{root}/constraints.txt" in upload and "cogvideox_5b.py" in upload
    assert ".whl" in upload and "github" not in out.stdout
    assert all("tpu-vm ssh pod" in l and "--worker=all" in l for l in (install, train))
    assert "gs://b/run/code/" in install and "-c\\ tttjax_code/constraints.txt" in install
    assert "TTTJAX_DISTRIBUTED=auto" in train and "~/tttjax_venv/bin/python" in train
    assert "--config\\ tttjax_code/cogvideox_5b.py:3s" in train and "--config.steps=10" in train
    # A bundled config by name needs no file; a pip spec in TTTJAX_SOURCE is installed as given.
    named = run("tpu_vm_pod.sh", "--tpu", "pod", "--zone", "z", "--config",
                "cogvideox_5b:3s,ttt_mlp", "--workdir", "gs://b/run", "--setup", "--dry-run",
                env={"TTTJAX_SOURCE": "git+https://example.org/mine.git@v1"})
    assert named.returncode == 0, named.stderr
    assert "pip wheel" not in named.stderr and "git+https://example.org/mine.git@v1" in named.stdout
    assert "--config\\ cogvideox_5b:3s" in named.stdout


def test_gke_xpk_dry_run_tpu_and_gpu():
    base = ["--cluster", "c", "--workload", "w", "--image", "img", "--config", "c.py",
            "--workdir", "gs://b", "--dry-run"]
    tpu = run("gke_xpk.sh", *base, "--tpu-type", "v5p-128", "--num-slices", "2")
    assert tpu.returncode == 0 and "xpk workload create" in tpu.stdout and "v5p-128" in tpu.stdout
    gpu = run("gke_xpk.sh", *base, "--device-type", "h100-80gb-8", "--num-nodes", "4")
    assert gpu.returncode == 0 and "--device-type h100-80gb-8 --num-nodes 4" in gpu.stdout
    built = run("gke_xpk.sh", *base, "--build-image", "--device-type", "h100-80gb-8")
    assert built.returncode == 0, built.stderr
    build, push, create = built.stdout.splitlines()
    assert "docker build -f" in build and "launch/Dockerfile" in build and "-t img" in build
    assert "EXTRAS=cuda12\\,gcs" in build and "launch/.dist/tttjax-" in build
    assert push == "+ docker push img" and "--docker-image img" in create


def test_slurm_dry_run_per_gpu_and_per_node():
    per_gpu = run("slurm_gpu.sbatch", "--config", "c.py", "--workdir", "/shared/r", "--dry-run")
    assert per_gpu.returncode == 0, per_gpu.stderr
    assert "srun" in per_gpu.stdout and "JAX_LOCAL_DEVICE_IDS=\\$SLURM_LOCALID" in per_gpu.stdout
    per_node = run("slurm_gpu.sbatch", "--config", "c.py", "--workdir", "/shared/r", "--dry-run", "--per-node")
    assert "JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3\\,4\\,5\\,6\\,7" in per_node.stdout


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm_pod.sh", ["--zone", "z", "--config", "c", "--workdir", "w"], "--tpu NAME is required"),
    ("gke_xpk.sh", ["--cluster", "c", "--workload", "w", "--image", "i", "--config", "c",
                    "--workdir", "w"], "give --tpu-type"),
    ("slurm_gpu.sbatch", ["--config", "c", "--workdir", "w"], "SLURM_JOB_ID is not set"),
    ("tpu_vm_pod.sh", ["--bogus"], "unknown option"),
])
def test_missing_environment_fails_early(script, args, message):
    out = run(script, *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
