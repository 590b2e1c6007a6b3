"""Observability of a training run on the tiny config: MFU / TFLOP/s in the records, held-out
evaluation, the profiler trace, the run record, the compile cache and the log-line prefix."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from etils import epath

from tiny_configs import tiny_config

from tttjax.bench.mfu import device_peak_tflops
from tttjax.train import log_lines, train
from tttjax.train.checkpoints import read_meta
from tttjax.train.metrics import MetricsLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} p0 \S+\] ")


def tiny(data_dir, **over):
    return tiny_config("none,1", **{
        "steps": 4, "log_every": 1, "checkpoint_every": 4, "data.data_dir": data_dir,
        "data.builder_overrides": dict(num_train=32, num_validation=8), "eval_every": 2,
        "eval.batches": 1, "eval.video_steps": 2, "profile.start_step": 1,
        "profile.num_steps": 2, **over})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("obs") / "run")
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    cfg = tiny(data_dir, compile_cache_dir=cache)
    result = train(cfg, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return cfg, workdir, cache, result, records


def test_records_carry_model_tflops_and_no_invented_mfu_on_cpu(run):
    _, _, _, result, records = run
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    # Step 1 compiles: no throughput; later steps have TFLOP/s per device. CPUs have no
    # listed peak, so no MFU is reported rather than a made-up one.
    assert train_records[0]["model_tflops_per_device"] is None
    assert all(r["model_tflops_per_device"] > 0 for r in train_records[1:])
    assert all("mfu" not in r for r in train_records)
    assert device_peak_tflops(jax.devices()) is None


def test_mfu_is_tflops_over_the_peak(tmp_path):
    logger = MetricsLogger(str(tmp_path), total_steps=2, start_step=0, tokens_per_step=10,
                           progress_bar=False, model_flops_per_step=4e12, num_devices=2,
                           peak_tflops=100.0)
    logger.reset_clock(0)
    window = [{"loss": 1.0, "grad_norm": 1.0, "finite": 1.0}]
    record = logger.log(2, window, {"nonfinite_total": 0})
    logger.close()
    tflops = record["steps_per_sec"] * 4e12 / 2 / 1e12
    assert record["model_tflops_per_device"] == pytest.approx(tflops)
    assert record["mfu"] == pytest.approx(tflops / 100.0)


def test_held_out_loss_every_eval_every_steps_deterministic(run, tmp_path):
    cfg, workdir, _, _, records = run
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        per_t = [r[f"eval_loss_t{t}"] for t in cfg.eval.timesteps]
        assert all(math.isfinite(v) for v in per_t)
        assert r["eval_loss"] == pytest.approx(sum(per_t) / len(per_t))
    # The same parameters give the same number (fixed examples, noise and timesteps).
    from tttjax.sharding import make_mesh
    from tttjax.train import config as config_lib
    from tttjax.train.evaluation import HeldOutEval
    from tttjax.train.loop import train_step_setup

    mesh = make_mesh(dict(cfg.mesh.axes))
    setup = train_step_setup(cfg, mesh, config_lib.rules(cfg))
    evaluator = HeldOutEval(setup.config, mesh, setup.plan.spec, setup.batch_shardings,
                            setup.batch_shapes)
    with jax.set_mesh(mesh):
        params = setup.plan.init_params()
        assert evaluator(params) == evaluator(params)


def _event_images(logdir: str) -> dict[int, tuple]:
    """{step: (height, width, png bytes)} of the `eval/video` images in the event files."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(epath.Path(logdir).glob("events.out.tfevents*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == "eval/video":
                    out[event.step] = (value.image.height, value.image.width,
                                       value.image.encoded_image_string)
    return out


def test_eval_video_in_tensorboard_is_the_held_out_sample(run):
    """Each evaluation logs one image: the held-out clip's real frames over the sample of its
    storyboard; the sample equals `python -m tttjax.sample`'s video of the same storyboard
    from the checkpoint of that step (same seed, steps, guidance and sampler)."""
    import copy
    import io

    import numpy as np
    from PIL import Image

    from tttjax.data import loader as data_loader
    from tttjax.generation import generate, load_generator
    from tttjax.storyboard import parse_storyboard

    cfg, workdir, *_ = run
    images = _event_images(os.path.join(workdir, "tensorboard"))
    assert sorted(images) == [2, 4]
    held_out = copy.deepcopy(cfg)
    held_out.data.split = cfg.eval.split
    window = data_loader.open_training_source(held_out)[0][0]
    truth = np.asarray(window["video"])                          # [F, H, W, 3], F = 1 + 8
    f, h, w, _ = truth.shape
    strips = {}
    for step, (height, width, png) in images.items():
        strip = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert (height, width) == (2 * h, f * w) and strip.shape == (2 * h, f * w, 3)
        np.testing.assert_array_equal(strip[:h], np.concatenate(list(truth), axis=1))
        strips[step] = strip[h:]
    assert not np.array_equal(strips[2], strips[4])              # the parameters changed

    captions = [c.decode() if isinstance(c, bytes) else c for c in window["captions"]]
    board = parse_storyboard([{"text": c, "requires_scene_transition": bool(s) and i > 0}
                              for i, (c, s) in enumerate(zip(captions, window["scene_start"]))])
    gen = load_generator(workdir)                                # the step-4 checkpoint
    video = generate(gen, board, seed=cfg.eval.seed, steps=cfg.eval.video_steps)
    ref = np.concatenate(list(video.frames), axis=1).astype(int)
    # the same program up to the mesh (8-way fsdp here, 8-way data in training): float
    # reductions may round differently, a few uint8 levels at most
    diff = np.abs(strips[4].astype(int) - ref)
    assert diff.max() <= 3 and diff.mean() < 0.1, (diff.max(), diff.mean())


def test_eval_video_needs_the_toon_world_and_an_evaluation(run, tmp_path):
    from tttjax.train import config as config_lib

    cfg, *_ = run
    bad = tiny(cfg.data.data_dir, **{"eval.video_steps": -1})
    with pytest.raises(ValueError, match="config.eval.video_steps must be an int >= 0"):
        config_lib.validate(bad)
    off = tiny(cfg.data.data_dir, eval_every=0)
    with pytest.raises(ValueError, match="config.eval.video_steps=2 but config.eval_every is 0"):
        config_lib.validate(off)
    latents = tiny(cfg.data.data_dir, **{"data.dataset": "latents"})
    with pytest.raises(ValueError, match="video_steps=2 samples the toon world"):
        config_lib._validate_observability(latents)   # (validate stops earlier: no such data)


def test_bad_eval_split_is_one_clear_error(run, tmp_path):
    cfg, *_ = run
    bad = tiny(cfg.data.data_dir, **{"eval.split": "test"})
    with pytest.raises(ValueError, match="config.eval.split.*no split 'test'"):
        train(bad, str(tmp_path / "w"))


def test_profile_trace_written_for_the_window(run):
    _, workdir, *_ = run
    traces = list(epath.Path(workdir, "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().length > 0


def test_run_record_in_run_json_and_checkpoint_meta(run):
    _, workdir, _, result, _ = run
    record = json.loads(epath.Path(workdir, "run.json").read_text())
    assert record["versions"]["jax"] == jax.__version__
    assert {"jaxlib", "flax", "optax", "orbax-checkpoint"} <= set(record["versions"])
    assert record["device_kind"] == jax.devices()[0].device_kind
    assert record["device_count"] == 8 and record["process_count"] == 1
    assert record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert "git_commit" in record and "platform_version" in record
    meta = read_meta(workdir, result.last_checkpoint)
    assert meta["run"]["mesh"] == record["mesh"]


def test_compile_cache_setting_restored_after_the_run(run):
    # The run compiled with the cache on; the process's setting is back to what it was.
    assert jax.config.jax_compilation_cache_dir is None


def test_log_lines_name_time_and_process():
    assert PREFIX.match(log_lines.line("hello", source="train"))


@pytest.mark.slow
def test_cli_fills_the_compile_cache_and_prints_start_up(tmp_path):
    """A separate process (the persistent cache matters across processes): the cache folder
    fills, and the start-up line and metric lines carry the absl prefix."""
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "tttjax.train", "--config", "configs/tiny.py:none,1",
            "--workdir", str(tmp_path / "run"), "--config.steps=2", "--config.log_every=1",
            f"--config.compile_cache_dir={cache}", "--config.train.progress_bar=False",
            f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.data.builder_overrides={'num_train': 16, 'num_validation': 0}",
            "--config.train.compiler_options={'xla_backend_optimization_level': 0}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start_up = [line for line in proc.stdout.splitlines() if "start-up:" in line]
    assert len(start_up) == 1 and PREFIX.match(start_up[0]), proc.stdout
    assert any(PREFIX.match(line) and "step 2: loss" in line for line in proc.stdout.splitlines())
    assert len(list(cache.iterdir())) >= 2   # the step and the initialisation, at least
