"""Faults a run must survive (issue 16): corrupted checkpoints, two runs on one workdir,
non-finite values, resumed metrics, Ctrl-C, invalid settings.

The Checkpointer cases use small pytrees (no model); the end-to-end cases reuse the tiny
configuration and fast XLA options of tests/test_train_run.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from test_train_run import STEPS, flat, losses, saved_params, signal_after_logging, tiny

from tttjax import sample as sample_cli
from tttjax.train import __main__ as train_cli
from tttjax.train import integrity
from tttjax.train.checkpoints import Checkpointer, CheckpointsRejected, newest_intact_step
from tttjax.train.loop import train
from tttjax.train.metrics import _drop_records_after
from tttjax.train.workdir_lock import WorkdirBusy, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = [{"text": "The orange cat walks slowly over to the right side of the kitchen."},
         {"text": "The little white mouse hops up and down happily."}]


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _write(path, data, mode="w"):
    with open(path, mode) as f:
        f.write(data)


# ------------------------------------------------------------------ checkpoint integrity


def _state(value: float):
    params = {"w": jnp.full((4, 8), value, jnp.float32), "b": jnp.arange(8, dtype=jnp.float32)}
    opt = {"mu": jnp.full((4, 8), value / 2, jnp.float32), "count": jnp.int32(3)}
    return params, opt


def _abstract(tree):
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _save_steps(workdir, steps, keep=3, async_save=True):
    ckpt = Checkpointer(workdir, keep=keep, async_save=async_save)
    for step in steps:
        params, opt = _state(float(step))
        assert ckpt.save(step, params, opt, {"counters": {"step": step}}, None) is None
    ckpt.close()


def _array_files(step_dir):
    """The OCDBT data files of the step's `params` item (what holds the array bytes)."""
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        out += [os.path.join(root, f) for f in files if "/d/" in os.path.join(root, f)]
    assert out, step_dir
    return sorted(out, key=os.path.getsize)


def flip_bytes(step_dir):
    path = _array_files(step_dir)[-1]
    data = bytearray(_read(path, "rb"))
    for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
        data[i] ^= 0xFF
    _write(path, bytes(data), "wb")
    return path


def truncate(step_dir):
    path = _array_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def garble_metadata(step_dir):
    path = os.path.join(step_dir, "params", "_METADATA")
    _write(path, "{not json")
    return path


CORRUPTIONS = {"flipped_bytes": flip_bytes, "truncated": truncate,
               "garbled_metadata": garble_metadata}


@pytest.mark.parametrize("async_save", [True, False])
def test_every_saved_step_has_a_manifest_of_all_its_files(tmp_path, async_save):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, (1, 2, 3), keep=2, async_save=async_save)
    root = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(root)) == ["2", "3"]
    for step in (2, 3):
        step_dir = os.path.join(root, str(step))
        with open(os.path.join(step_dir, integrity.MANIFEST)) as f:
            listed = set(json.load(f)["files"])
        on_disk = {os.path.relpath(os.path.join(r, n), step_dir)
                   for r, _, files in os.walk(step_dir) for n in files}
        assert "params/_METADATA" in listed and "meta/metadata" in listed
        assert any("/d/" in f for f in listed), listed
        # everything but Orbax's own commit bookkeeping and the manifest itself
        assert on_disk - listed <= {"_CHECKPOINT_METADATA", "commit_success.txt",
                                    integrity.MANIFEST}, on_disk - listed
        assert integrity.verify_step(step_dir) is None


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_step_is_detected_and_restore_falls_back(tmp_path, corruption):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, (1, 2, 3))
    damaged = CORRUPTIONS[corruption](os.path.join(workdir, "checkpoints", "3"))
    reason = integrity.verify_step(os.path.join(workdir, "checkpoints", "3"))
    assert reason is not None and os.path.relpath(damaged, os.path.join(workdir, "checkpoints", "3")) in reason
    assert newest_intact_step(workdir) == 2

    params, opt = _state(0.0)
    ckpt = Checkpointer(workdir)
    got = ckpt.restore_newest_intact(_abstract(params), _abstract(opt))
    assert got.step == 2 and [s for s, _ in got.rejected] == [3]
    np.testing.assert_array_equal(got.params["w"], np.full((4, 8), 2.0, np.float32))
    # the corrupt step is set aside (kept, out of Orbax's way) and can be saved again
    assert ckpt.all_steps() == [1, 2]
    assert os.path.isdir(os.path.join(workdir, "checkpoints_rejected", "3", "params"))
    p3, o3 = _state(3.5)
    assert ckpt.save(3, p3, o3, {"counters": {"step": 3}}, None) is None
    ckpt.close()
    assert integrity.verify_step(os.path.join(workdir, "checkpoints", "3")) is None


def test_no_trustworthy_step_is_an_error_naming_every_step(tmp_path):
    workdir = str(tmp_path / "run")
    _save_steps(workdir, (1, 2))
    for step in (1, 2):
        flip_bytes(os.path.join(workdir, "checkpoints", str(step)))
    params, opt = _state(0.0)
    ckpt = Checkpointer(workdir)
    with pytest.raises(CheckpointsRejected, match=r"step 2: params/.*SHA-256.*step 1: params/"):
        ckpt.restore_newest_intact(_abstract(params), _abstract(opt))
    assert ckpt.all_steps() == [1, 2]      # nothing moved when nothing can be used
    ckpt.close()


def test_steps_without_manifest_are_checked_by_restoring_and_for_finiteness(tmp_path):
    """Checkpoints written before manifests existed: used if they restore and are finite."""
    workdir = str(tmp_path / "run")
    _save_steps(workdir, (1, 2, 3))
    for step in (1, 2, 3):
        os.remove(os.path.join(workdir, "checkpoints", str(step), integrity.MANIFEST))
    truncate(os.path.join(workdir, "checkpoints", "3"))
    params, opt = _state(0.0)
    ckpt = Checkpointer(workdir)
    got = ckpt.restore_newest_intact(_abstract(params), _abstract(opt))
    assert got.step == 2 and got.rejected[0][0] == 3
    assert "no integrity manifest and it does not restore" in got.rejected[0][1]
    ckpt.close()


def test_nonfinite_state_is_never_saved_and_rotation_keeps_the_good_step(tmp_path):
    workdir = str(tmp_path / "run")
    ckpt = Checkpointer(workdir, keep=1)
    params, opt = _state(1.0)
    assert ckpt.save(1, params, opt, {}, None) is None
    for step in (2, 3):
        bad_params, bad_opt = _state(float("nan") if step == 2 else float("inf"))
        reason = ckpt.save(step, bad_params, bad_opt, {}, None)
        assert reason.startswith(f"not saving step {step}: non-finite values in 2 tensors"), reason
    ckpt.close()
    assert Checkpointer(workdir).all_steps() == [1]


def test_restore_refuses_finite_checksummed_steps_that_hold_nan(tmp_path):
    """A step whose files are intact but whose values are not finite (saved by an older
    version, say) is rejected like a corrupt one."""
    workdir = str(tmp_path / "run")
    _save_steps(workdir, (1,))
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    nan_params, nan_opt = _state(float("nan"))
    manager.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(nan_params),
                                            opt_state=ocp.args.StandardSave(nan_opt),
                                            meta=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()
    params, opt = _state(0.0)
    ckpt = Checkpointer(workdir)
    got = ckpt.restore_newest_intact(_abstract(params), _abstract(opt))
    assert got.step == 1 and got.rejected == [(2, "non-finite values in 2 tensors (opt_state/mu ...)")]
    ckpt.close()


# ------------------------------------------------------------------ workdir lock


def test_second_holder_of_a_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    busy = rf"in use by another run \(host .+, pid {os.getpid()}, since "
    with WorkdirLock(workdir), pytest.raises(WorkdirBusy, match=busy):
        WorkdirLock(workdir).acquire()
    with WorkdirLock(workdir) as lock:      # released: free again
        assert lock.held


def test_lock_of_a_killed_process_is_free_at_once(tmp_path):
    workdir = str(tmp_path / "run")
    code = textwrap.dedent(f"""
        import sys, time
        from tttjax.train.workdir_lock import WorkdirLock
        WorkdirLock({workdir!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=rf"pid {proc.pid}"):
            WorkdirLock(workdir).acquire()
    finally:
        proc.kill()
        proc.wait()
    with WorkdirLock(workdir):
        pass


# ------------------------------------------------------------------ metrics on resume


def test_metrics_records_after_the_restored_step_are_dropped(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)]
    with open(path, "w") as f:
        f.writelines(lines + ['{"step": 8, "lo'])          # a torn last line
    _drop_records_after(path, 5)
    assert _read(path) == "".join(lines[:5])


# ------------------------------------------------------------------ up-front usage errors


def _config_error(argv):
    from tttjax.command_line import UsageError, parse_config_flags

    with pytest.raises(UsageError) as info:
        parse_config_flags("prog", "doc", argv)
    message = " ".join(str(info.value).split())
    assert "Traceback" not in message and 'File "' not in message, message
    return message


def test_config_argument_and_file_errors_are_one_readable_line(tmp_path):
    tiny_py = os.path.join(ROOT, "configs", "tiny.py")
    message = _config_error(["--config", f"{tiny_py}:a,b,c"])
    assert message.endswith("ValueError: tiny: too many values in 'a,b,c'; the arguments are "
                            "mixer=...,segments=..."), message
    message = _config_error(["--config", f"{tiny_py}:bogus"])
    assert "mixer 'bogus' is not registered" in message and len(message) < 300, message
    # (a fresh process: ml_collections reuses the module object of the config loaded before)
    no_function = tmp_path / "cfg.py"
    no_function.write_text("X = 1\n")
    proc = subprocess.run([sys.executable, "-m", "tttjax.train", "--config", str(no_function),
                           "--workdir", str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)
    err = [line for line in proc.stderr.splitlines() if line.startswith("python -m tttjax.train")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "defines no get_config() function" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mixer,value", [("ttt_mlp", 0), ("ttt_linear", -4)])
def test_mixer_settings_are_validated_with_the_config(mixer, value):
    tiny_py = os.path.join(ROOT, "configs", "tiny.py")
    message = _config_error(["--config", f"{tiny_py}:{mixer}",
                             f"--config.model.mixer_config.{mixer}.mini_batch_size={value}"])
    assert f"config.model.mixer_config.{mixer}:" in message and "mini_batch_size" in message


def test_storyboard_edge_cases_are_one_line_before_the_model_loads(tmp_path, capsys):
    cases = {"surrogate.json": '[{"text": "a cat \\ud800 sits"}]',
             "deep.json": "[" * 100000 + "]" * 100000}
    expected = {"surrogate.json": "field 'text' holds an unpaired surrogate '\\ud800'",
                "deep.json": "JSON nested too deeply"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code = sample_cli.main(["--workdir", str(tmp_path), "--storyboard", str(tmp_path / name),
                                "--out", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected[name] in err[0], err


def test_unwritable_output_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "story.json").write_text(json.dumps(STORY))
    code = sample_cli.main(["--workdir", str(tmp_path / "nonexistent"), "--storyboard",
                            str(tmp_path / "story.json"), "--out", "/proc/tttjax_out.mp4"])
    err = capsys.readouterr().err.strip().splitlines()
    # /proc takes no new files, even for root: refused before the workdir is even looked at
    assert code == 2 and len(err) == 1 and "cannot write in '/proc'" in err[0], err


def test_sigterm_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    from tttjax import video_io
    from tttjax.generation import Video

    frames = np.zeros((9, 16, 16, 3), np.uint8)
    video = Video(frames=frames, latents=np.zeros((3, 4, 2, 2), np.float32),
                  captions=["a", "b"], fps=8.0, frames_per_segment=4, prefix_frames=1)

    def killed_midway(frames, path, **kwargs):
        _write(path, b"GIF89a partial", "wb")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the write")

    monkeypatch.setattr(video_io, "write_gif", killed_midway)
    with pytest.raises(sample_cli.Interrupted, match="SIGTERM"), sample_cli.interruptible():
        sample_cli.write_outputs(video, str(tmp_path / "v.mp4"), str(tmp_path / "v.gif"))
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"]        # whole MP4, no v.partial.gif
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ------------------------------------------------------------------ end to end (tiny model)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The tiny run of tests/test_train_run.py: 24 steps, checkpoints at 8, 16, 24."""
    workdir = str(tmp_path_factory.mktemp("run_a"))
    return workdir, train(tiny(data_dir), workdir)




def _sample(workdir, tmp_path, capsys):
    story = tmp_path / "story.json"
    story.write_text(json.dumps(STORY))
    out = tmp_path / "out.mp4"
    capsys.readouterr()
    code = sample_cli.main(["--workdir", workdir, "--storyboard", str(story), "--out", str(out),
                            "--steps", "2"])
    return code, capsys.readouterr(), out


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_corrupt_latest_checkpoint_sampling_refuses_and_training_falls_back(
        uninterrupted, data_dir, tmp_path, capsys):
    workdir_a, _ = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(workdir_a, workdir)
    flip_bytes(os.path.join(workdir, "checkpoints", str(STEPS)))

    code, out, video = _sample(workdir, tmp_path, capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out
    assert f"checkpoint step {STEPS} (" in lines[0] and "is corrupt: params/" in lines[0]
    assert "SHA-256 differs" in lines[0] and "step 16 is intact" in lines[0], lines[0]
    assert not video.exists()

    result = train(tiny(data_dir), workdir)
    said = [line for line in capsys.readouterr().out.splitlines() if "verification" in line]
    assert len(said) == 1 and f"checkpoint step {STEPS} failed verification (step {STEPS}: params/" in said[0]
    assert "resuming from step 16, the newest that verifies" in said[0], said
    assert result.step == STEPS
    # steps 17..24 again, bitwise as the uninterrupted run; one record per step
    assert _records(workdir) == list(range(1, STEPS + 1))
    assert losses(workdir) == losses(workdir_a)
    a, b = flat(saved_params(workdir_a, STEPS)), flat(saved_params(workdir, STEPS))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert os.listdir(os.path.join(workdir, "checkpoints_rejected")) == [str(STEPS)]
    assert integrity.verify_step(os.path.join(workdir, "checkpoints", str(STEPS))) is None


def test_second_run_on_a_workdir_exits_2_at_once_naming_the_holder(data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    workdir = str(tmp_path / "run")
    cfg = tiny(data_dir)
    monkeypatch.setattr("tttjax.command_line.parse_config_flags",
                        lambda *a, **k: (cfg, type("F", (), {"workdir": workdir})()))
    with WorkdirLock(workdir):
        code = train_cli.main(["prog"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"is in use by another run (host {os.uname().nodename}, pid {os.getpid()}" in err[0]
    assert sorted(os.listdir(workdir)) == [".lock"]          # nothing else written


def test_workdir_that_is_a_file_is_a_usage_error(data_dir, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(tiny(data_dir), str(path))


def test_other_model_on_a_workdir_is_refused_before_anything_is_written(
        uninterrupted, data_dir, tmp_path, capsys):
    workdir_a, _ = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(workdir_a, workdir)
    before = _read(os.path.join(workdir, "config.json"))
    with pytest.raises(ValueError) as info:
        train(tiny(data_dir, "ttt_linear"), workdir)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert "holds checkpoints (step 24) of another model" in message
    assert "config.model.mixer: 'none' in the checkpoints, 'ttt_linear' now" in message
    assert _read(os.path.join(workdir, "config.json")) == before
    assert _records(workdir) == list(range(1, STEPS + 1))

    # sampling a training workdir never makes parameters up: missing mixer = error, exit 2
    config = json.loads(before)
    config["model"]["mixer"] = "ttt_linear"
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    code, out, video = _sample(workdir, tmp_path, capsys)
    assert code == 2 and "missing parameters ['blocks/mixer/" in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1 and not video.exists()


def test_a_run_whose_lock_was_taken_stops_with_one_line_exit_1(data_dir, tmp_path, capsys,
                                                               monkeypatch):
    """An object-store lock can be taken over (a heartbeat that stalled past the stale limit);
    the run that lost it must stop writing: one line, exit 1, nothing saved after."""
    from tttjax.train.metrics import MetricsLogger
    from tttjax.train.workdir_lock import WorkdirLock

    workdir = str(tmp_path / "run")
    cfg = tiny(data_dir, checkpoint_every=4)
    monkeypatch.setattr("tttjax.command_line.parse_config_flags",
                        lambda *a, **k: (cfg, type("F", (), {"workdir": workdir})()))
    taken = {}
    log = MetricsLogger.log

    def log_then_take(self, at, *args, **kwargs):   # "another run" takes the lock at step 5,
        # which the loop sees after step 6 (its check comes before the logging)
        if at == 5:
            taken["why"] = "the lock gs://b/run/.lock was taken over by another run (test)"
        return log(self, at, *args, **kwargs)

    monkeypatch.setattr(MetricsLogger, "log", log_then_take)
    monkeypatch.setattr(WorkdirLock, "lost", property(lambda self: taken.get("why")))
    code = train_cli.main(["prog"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("python -m tttjax.train: error: stopped at step 6 "
                                            "without saving: the lock gs://b/run/.lock"), err[-3:]
    assert Checkpointer(workdir).all_steps() == [4]


def test_ctrl_c_saves_the_current_step_exits_130_and_resumes_exactly(
        uninterrupted, data_dir, tmp_path, capsys, monkeypatch):
    workdir_a, _ = uninterrupted
    workdir = str(tmp_path / "run")
    cfg = tiny(data_dir, checkpoint_every=4)
    monkeypatch.setattr("tttjax.command_line.parse_config_flags",
                        lambda *a, **k: (cfg, type("F", (), {"workdir": workdir})()))
    handler_before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        signal_after_logging(patch, 6, signal.SIGINT)
        code = train_cli.main(["prog"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 130 and out[-1].startswith("interrupted (Ctrl-C): "), out[-3:]
    assert signal.getsignal(signal.SIGINT) == handler_before
    saved = Checkpointer(workdir).latest_step()
    assert 6 <= saved < STEPS and max(_records(workdir)) == saved
    assert f"last checkpoint: step {saved}" in out[-1]
    train(cfg, workdir)
    assert _records(workdir) == list(range(1, STEPS + 1))
    assert losses(workdir) == losses(workdir_a)


def _du(path):
    """Bytes allocated (blocks, as a tmpfs counts them) under `path`."""
    return sum(os.stat(os.path.join(r, f)).st_blocks * 512
               for r, _, files in os.walk(path) for f in files)


def test_disk_full_during_an_async_save_is_one_line_exit_1_older_steps_kept(
        uninterrupted, data_dir, tmp_path, capsys, monkeypatch):
    """A tmpfs that holds one checkpoint of the tiny model but not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    workdir_a, _ = uninterrupted
    step_bytes = _du(os.path.join(workdir_a, "checkpoints", "8"))
    mount = tmp_path / "small"
    mount.mkdir()
    size_kb = int(step_bytes * 1.6 / 1024) + 256
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        workdir = str(mount / "run")
        cfg = tiny(data_dir)
        monkeypatch.setattr("tttjax.command_line.parse_config_flags",
                            lambda *a, **k: (cfg, type("F", (), {"workdir": workdir})()))
        code = train_cli.main(["prog"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("python -m tttjax.train")]
        assert code == 1 and len(lines) == 1, err[-3000:]
        assert "No space left on device" in lines[0] and workdir in lines[0], lines
        assert "Traceback" not in err
        ckpt = Checkpointer(workdir)
        steps = ckpt.all_steps()
        ckpt.close()
        # Which write meets the full disk first is a race between the background save and the
        # loop's own writes (metrics, TensorBoard): usually the save of step 16, reported with
        # the step and the steps kept (the cause from TensorStore or from Python); otherwise
        # the loop's write, one line naming the path. Either way no committed step is lost
        # or left unverifiable, and a partial step is not listed.
        if "saving checkpoint" in lines[0]:
            assert re.search(r"saving checkpoint step 16 failed: .*No space left on device .*"
                             r"\(writing " + re.escape(workdir), lines[0]), lines
            assert "older checkpoints are kept: 8" in lines[0]
            assert steps == [8]
        for step in steps:
            assert integrity.verify_step(os.path.join(workdir, "checkpoints", str(step))) is None
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("group,lr", [("pretrained", float("inf")), ("new", float("nan")),
                                      ("new", -1e-4)])
def test_nonfinite_or_negative_learning_rates_are_refused(data_dir, group, lr):
    from tttjax.train import config as config_lib

    with pytest.raises(ValueError, match=rf"config.optim.{group}.lr must be a finite number >= 0"):
        config_lib.validate(tiny(data_dir, **{f"optim.{group}.lr": lr}))


def test_ttt_mini_batch_longer_than_the_sequence_is_refused(data_dir):
    from tttjax.train import config as config_lib

    cfg = tiny(data_dir, "ttt_mlp", **{"model.mixer_config.ttt_mlp.mini_batch_size": 100000})
    with pytest.raises(ValueError, match=r"mini_batch_size 100000 is longer than the mixer's "
                                         r"sequence \(96 tokens: 2 x 8 text \+ 80 video\)"):
        config_lib.validate(cfg)


def test_updates_to_nonfinite_parameters_are_skipped_and_never_saved(data_dir, tmp_path,
                                                                     monkeypatch):
    """lr = inf (validation bypassed): finite loss, infinite update. Every update is skipped,
    every checkpoint is finite, and the stop message names the newest one."""
    from tttjax.train import config as config_lib
    from tttjax.train.loop import TrainingDiverged

    monkeypatch.setattr(config_lib, "validate", lambda config: config)
    cfg = tiny(data_dir, **{"optim.pretrained.lr": float("inf"), "optim.new.lr": float("inf"),
                            "checkpoint_every": 1, "train.max_nonfinite_in_a_row": 3})
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row .* newest checkpoint "
                                               r"\(checkpoints hold only finite values\): step 2"):
        train(cfg, workdir)
    assert set(losses(workdir).values()) == {None}        # every step counted as skipped
    steps = Checkpointer(workdir).all_steps()
    assert steps and max(steps) <= 3
    first = flat(saved_params(workdir, steps[0]))
    for step in steps:
        for name, value in flat(saved_params(workdir, step)).items():
            assert np.isfinite(value).all(), (step, name)
            np.testing.assert_array_equal(value, first[name], err_msg=name)  # nothing applied


_CHAOS_DRIVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_train_run import tiny
from tttjax.train import integrity
from tttjax.train.loop import train
if os.environ.get("SLOW_MANIFEST"):     # hold the save open: the kill lands inside it
    write = integrity.write_manifest
    def slow(step_dir):
        with open(os.environ["SLOW_MANIFEST"] + ".tmp", "w") as f:
            f.write(step_dir)
        os.replace(os.environ["SLOW_MANIFEST"] + ".tmp", os.environ["SLOW_MANIFEST"])
        time.sleep(60)
        return write(step_dir)
    integrity.write_manifest = slow
train(tiny({data_dir!r}, checkpoint_every=4), {workdir!r})
print("finished", flush=True)
"""


def test_chaos_kill_9_at_start_up_mid_step_and_during_a_save_then_resume_bitwise(
        uninterrupted, data_dir, tmp_path):
    """kill -9 at start-up, between saves and inside an asynchronous save (its manifest is
    held back so the kill lands before Orbax commits the step); each restart resumes from
    the newest committed step, and the final parameters equal an uninterrupted run's."""
    workdir_a, _ = uninterrupted
    workdir = str(tmp_path / "run")
    metrics = os.path.join(workdir, "metrics.jsonl")
    marker = str(tmp_path / "saving")
    script = _CHAOS_DRIVER.format(tests=os.path.join(ROOT, "tests"), data_dir=data_dir,
                                  workdir=workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

    def run(until, slow_manifest=False, timeout=300):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=dict(env, SLOW_MANIFEST=marker) if slow_manifest else env)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and proc.poll() is None:
                if until(proc):
                    proc.kill()                    # SIGKILL: no handler, no clean-up
                    break
                time.sleep(0.01)
            proc.wait(timeout=60)
            return proc.returncode, proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def lines():
        return len(_read(metrics).splitlines()) if os.path.exists(metrics) else 0

    code, _ = run(lambda p: os.path.exists(os.path.join(workdir, ".lock")))   # start-up
    assert code == -signal.SIGKILL and not Checkpointer(workdir).all_steps()
    def committed():
        root = os.path.join(workdir, "checkpoints")
        return os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root))

    code, _ = run(lambda p: lines() >= 6 and committed())                     # mid-run
    assert code == -signal.SIGKILL
    first = Checkpointer(workdir).all_steps()
    assert first and max(first) >= 4, first

    code, _ = run(lambda p: os.path.exists(marker), slow_manifest=True)       # inside a save
    assert code == -signal.SIGKILL
    saving = _read(marker)
    assert saving.endswith(".orbax-checkpoint-tmp") and os.path.isdir(saving), saving
    assert Checkpointer(workdir).all_steps() == first       # the interrupted step never committed
    code, out = run(lambda p: False)                                           # to the end
    assert code == 0 and "finished" in out, out[-2000:]
    assert _records(workdir) == list(range(1, STEPS + 1))
    assert losses(workdir) == losses(workdir_a)
    a, b = flat(saved_params(workdir_a, STEPS)), flat(saved_params(workdir, STEPS))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_read_only_workdir_is_a_usage_error_before_compiling(data_dir, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(ValueError, match=r"workdir .*/ro/run cannot be written \(Read-only "
                                             r"file system"):
            train(tiny(data_dir), str(mount / "run"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)
