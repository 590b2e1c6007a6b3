"""Workdirs in a Cloud Storage bucket, end to end, against a local emulator (no network).

`tests/gcs_emulator.py` starts fake-gcs-server on 127.0.0.1 and points gcsfs,
google-cloud-storage, TensorStore and ArrayRecord at it. One bucket run of the smallest
config (1 block of width 16 on 2 devices, 4 steps) is shared by the tests of this module: it
trains to `gs://bucket/run` with its TFDS data_dir in the bucket too, stops (as a preemption
would) and resumes; its losses and parameters equal a local run's bitwise; checkpoints carry
a verifying integrity manifest; its compile cache is in the bucket; `python -m tttjax.sample`
reads the bucket run and writes its video to the bucket. A corrupt bucket checkpoint of the
same run is set aside and the steps after the previous one redone, again bitwise equal to
the local run. The object-store workdir lock is checked on its own (busy, release, stale
take-over).

Cost: the train step, its initialisation and the sampler are compiled once each (the
trainer memoises compiled steps per config and mesh, so the bucket runs reuse the local
run's); the rest is I/O against the emulator. The local run and the sampler compile through
a persistent XLA cache in pytest's cache folder (`.pytest_cache/d/tttjax_xla`; the key
covers program, devices and compiler version), so a re-run loads them instead of compiling;
the bucket run keeps its default cache, `gs://bucket/run/compile_cache`.
"""

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_configs import tiny_config

import gcs_emulator
from test_train_run import flat, losses
from tttjax import storage

pytestmark = pytest.mark.skipif(gcs_emulator.available() is not None,
                                reason=str(gcs_emulator.available()))

STEPS = 4
URL = "gs://bucket/run"


def _config(data_dir):
    """The smallest model the trainer runs: what is tested here is storage, not numerics."""
    return tiny_config("none", **{
        "steps": STEPS, "checkpoint_every": 2, "log_every": 1, "data.data_dir": data_dir,
        "data.builder_overrides": dict(num_train=16, num_validation=0),
        "model.num_layers": 1, "model.num_attention_heads": 1, "model.attention_head_dim": 16,
        "model.text_embed_dim": 8, "model.time_embed_dim": 8,
        "mesh.num_devices": 2, "mesh.axes": dict(data=2, fsdp=1, tensor=1),
        "train.global_batch_size": 2})


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator.GCSEmulator() as emulator:
        emulator.create_bucket("bucket")
        yield emulator


@pytest.fixture(scope="module")
def xla_cache(request):
    return str(request.config.cache.mkdir("tttjax_xla"))


@pytest.fixture(scope="module")
def runs(gcs, xla_cache, tmp_path_factory):
    """(local workdir, its data_dir): the local run and the stopped-and-resumed bucket run."""
    from tttjax.train import train

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    local = str(tmp_path_factory.mktemp("local") / "run")
    config = _config(data_dir)
    config.compile_cache_dir = xla_cache
    train(config, local)
    # the bucket run reads its data from the bucket too (built locally, uploaded)
    bucket_data = "gs://bucket/tfds"
    first = train(_config(bucket_data), URL, stop_at=1)   # stopped as a preemption would be
    assert first.preempted and first.last_checkpoint == 1
    assert storage.path(bucket_data).is_dir()
    second = train(_config(bucket_data), URL + "/")   # resumes (a trailing slash: the same run)
    assert second.step == STEPS and second.records[0]["step"] == 2
    return local, data_dir


def _bucket_losses(url):
    lines = storage.path(f"{url}/metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _params(root):
    return flat(ocp.PyTreeCheckpointer().restore(f"{root}/checkpoints/{STEPS}/params"))


def _assert_equal_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bucket_run_stopped_and_resumed_equals_local_bitwise(runs):
    from tttjax.train import integrity
    from tttjax.train.checkpoints import Checkpointer

    local, _ = runs
    assert _bucket_losses(URL) == losses(local)        # bitwise, every step
    _assert_equal_params(_params(local), _params(URL))

    run = storage.path(URL)
    assert {"config.json", "metrics.jsonl", "checkpoints", "tensorboard", "compile_cache"} <= {
        p.name for p in run.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert any((run / "compile_cache").iterdir())      # JAX's cache written through epath
    assert not (run / ".lock").exists()                # released
    assert Checkpointer(URL).all_steps() == [1, 2, STEPS]
    for step in (2, STEPS):
        step_dir = f"{URL}/checkpoints/{step}"
        assert integrity.has_manifest(step_dir) and integrity.verify_step(step_dir) is None


def test_sample_reads_the_bucket_run_and_writes_to_the_bucket(runs, xla_cache, tmp_path):
    from tttjax import compile_cache
    from tttjax import sample as sample_cli

    story = tmp_path / "story.json"
    story.write_text(json.dumps([{"text": "The orange cat walks to the right."}]))
    out = "gs://bucket/samples/cat.mp4"
    with compile_cache.persistent(xla_cache):
        assert sample_cli.main(["--workdir", URL, "--storyboard", str(story), "--out", out,
                                "--steps", "1"]) == 0
    video = storage.path(out)
    assert video.is_file() and video.read_bytes()[4:8] == b"ftyp"      # an MP4 container
    assert [p.name for p in video.parent.iterdir()] == ["cat.mp4"]    # no probe left


def test_corrupt_bucket_checkpoint_is_set_aside_and_the_run_resumes_before_it(runs):
    from tttjax.train import integrity, train
    from tttjax.train.checkpoints import Checkpointer

    local, _ = runs
    step_dir = storage.path(f"{URL}/checkpoints/{STEPS}")
    victim = step_dir / next(r for r in integrity._files(step_dir) if "/d/" in r)
    victim.write_bytes(b"\0" * len(victim.read_bytes()))
    result = train(_config("gs://bucket/tfds"), URL)    # STEPS is rejected: resumes from 2
    assert result.step == STEPS and result.records[0]["step"] == 3
    rejected = storage.path(f"{URL}/checkpoints_rejected/{STEPS}")
    assert (rejected / "integrity.json").is_file() and (rejected / victim.relative_to(step_dir)).is_file()
    assert Checkpointer(URL).all_steps() == [1, 2, STEPS]
    assert integrity.verify_step(str(step_dir)) is None  # saved afresh
    assert _bucket_losses(URL) == losses(local)          # the redone steps: bitwise the same
    _assert_equal_params(_params(local), _params(URL))


def test_object_store_lock_busy_release_and_stale_takeover(gcs):
    from tttjax.train.workdir_lock import WorkdirBusy, WorkdirLock

    url = "gs://bucket/locked"
    with WorkdirLock(url, heartbeat_s=0.1) as lock:
        with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()}.*gcloud storage rm {url}/.lock"):
            WorkdirLock(url).acquire()
        time.sleep(0.35)                              # a few heartbeats: still ours
        assert lock.held and lock.lost is None
    assert not storage.path(f"{url}/.lock").exists()  # released: deleted

    dead = WorkdirLock(url, heartbeat_s=3600).acquire()   # a run that stops beating
    time.sleep(1.2)
    taker = WorkdirLock(url, stale_after_s=1.0).acquire()  # its lock is stale: taken over
    record = json.loads(storage.path(f"{url}/.lock").read_text())
    assert record["pid"] == os.getpid() and record["run"] == taker._object._record["run"]
    taker.release()
    dead._object._stop.set()                          # the "dead" run never releases
    assert not storage.path(f"{url}/.lock").exists()


def test_paths_helpers_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("gs://b/run/") == "gs://b/run"
    assert storage.resolve("run") == str(tmp_path / "run")
    assert storage.is_url("gs://b") and not storage.is_url("/x/gs://b")
    storage.write_text_atomic(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}" and not (tmp_path / "a.json.tmp").exists()
    assert jax.device_count() >= 2   # conftest's fake devices (the runs above use 2)
