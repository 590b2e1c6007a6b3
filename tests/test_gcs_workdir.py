"""Workdirs in a Cloud Storage bucket, end to end, against a local emulator (no network).

`tests/gcs_emulator.py` starts fake-gcs-server on 127.0.0.1 and points gcsfs,
google-cloud-storage, TensorStore and ArrayRecord at it. The tiny config trains to
`gs://bucket/run`, its TFDS data_dir in the bucket too, stops (as a preemption would) and
resumes; its losses and parameters equal a local run's bitwise; checkpoints carry a verifying
integrity manifest; `python -m tttjax.sample` reads the bucket run and writes its video to the
bucket. A corrupt bucket checkpoint is set aside; the object-store workdir lock is checked on
its own (busy, release, stale take-over).
"""

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import gcs_emulator
from test_train_run import flat, losses, tiny
from tttjax import storage

pytestmark = pytest.mark.skipif(gcs_emulator.available() is not None,
                                reason=str(gcs_emulator.available()))

STEPS = 6


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator.GCSEmulator() as emulator:
        emulator.create_bucket("bucket")
        yield emulator


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir):
    return tiny(data_dir, **{"steps": STEPS, "checkpoint_every": 3})


def _bucket_losses(url):
    lines = storage.path(f"{url}/metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_train_to_bucket_resume_bitwise_and_sample(gcs, data_dir, tmp_path):
    from tttjax import sample as sample_cli
    from tttjax.train import integrity, train
    from tttjax.train.checkpoints import Checkpointer

    local = str(tmp_path / "local")
    train(_config(data_dir), local)
    # the bucket run reads its data from the bucket too (built locally, uploaded)
    url, bucket_data = "gs://bucket/run", "gs://bucket/tfds"
    first = train(_config(bucket_data), url, stop_at=2)   # stopped as a preemption would be
    assert first.preempted and first.last_checkpoint == 2
    assert storage.path(bucket_data).is_dir()
    second = train(_config(bucket_data), url + "/")   # resumes (a trailing slash: the same run)
    assert second.step == STEPS

    assert _bucket_losses(url) == losses(local)        # bitwise, every step
    params = lambda root: flat(ocp.PyTreeCheckpointer().restore(  # noqa: E731
        f"{root}/checkpoints/{STEPS}/params"))
    a, b = params(local), params(url)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    run = storage.path(url)
    assert {"config.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= {
        p.name for p in run.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert not (run / ".lock").exists()                # released
    assert Checkpointer(url).all_steps() == [2, 3, 6]
    for step in (3, STEPS):
        step_dir = f"{url}/checkpoints/{step}"
        assert integrity.has_manifest(step_dir) and integrity.verify_step(step_dir) is None

    # sample the bucket run (its latest checkpoint), writing the video to the bucket
    story = tmp_path / "story.json"
    story.write_text(json.dumps([{"text": "The orange cat walks to the right."}]))
    out = "gs://bucket/samples/cat.mp4"
    assert sample_cli.main(["--workdir", url, "--storyboard", str(story), "--out", out,
                            "--steps", "1"]) == 0
    video = storage.path(out)
    assert video.is_file() and video.read_bytes()[4:8] == b"ftyp"      # an MP4 container
    assert [p.name for p in video.parent.iterdir()] == ["cat.mp4"]    # no probe left


def test_corrupt_bucket_checkpoint_is_set_aside_and_the_run_resumes_before_it(gcs, data_dir):
    from tttjax.train import integrity, train
    from tttjax.train.checkpoints import Checkpointer

    url = "gs://bucket/corrupt"
    train(_config(data_dir), url)                       # saves steps 3 and 6
    step_dir = storage.path(f"{url}/checkpoints/{STEPS}")
    victim = step_dir / next(r for r in integrity._files(step_dir) if "/d/" in r)
    victim.write_bytes(b"\0" * len(victim.read_bytes()))
    result = train(_config(data_dir), url)              # 6 is rejected: resumes from 3
    assert result.step == STEPS and result.records[0]["step"] == 4
    rejected = storage.path(f"{url}/checkpoints_rejected/{STEPS}")
    assert (rejected / "integrity.json").is_file() and (rejected / victim.relative_to(step_dir)).is_file()
    assert Checkpointer(url).all_steps() == [3, STEPS]
    assert integrity.verify_step(str(step_dir)) is None  # saved afresh


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
    assert jax.device_count() == 8   # conftest's fake devices (the runs above rely on them)
