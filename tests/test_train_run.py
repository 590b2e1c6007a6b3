"""The training loop in-process: loss falls, exact resume, meshes, mixers, warm starts, NaNs.

Runs share compiled steps: `tttjax.train.loop` memoises what it compiles per (config, mesh),
so every run below with the tiny config on the default 8-device mesh compiles once. XLA's
CPU backend optimisation is turned off (`compiler_options`) to keep compiles short.
"""

import json
import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tiny_configs import FAST, tiny_config

from tttjax import sharding as shd
from tttjax.data import loader as data_loader
from tttjax.layers import registry
from tttjax.models.dit_weights import save_checkpoint
from tttjax.sharding import make_mesh
from tttjax.train import TrainingDiverged, train
from tttjax.train import config as config_lib
from tttjax.train.checkpoints import Checkpointer, read_meta
from tttjax.train.loop import _plan
from tttjax.train.model_state import load_params
from tttjax.train.optimizer import path_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny(data_dir, mixer="none", **over):
    return tiny_config(mixer, **{"steps": STEPS, "log_every": 1, "checkpoint_every": 8,
                                 "data.data_dir": data_dir,
                                 "data.builder_overrides": dict(num_train=64, num_validation=0),
                                 **over})


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def saved_params(workdir, step):
    return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "params"))


def flat(tree):
    return {"/".join(path_names(p)): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run_a"))
    result = train(tiny(data_dir), workdir)
    return workdir, result


def test_tiny_config_trains_loss_falls_and_logs(uninterrupted):
    workdir, result = uninterrupted
    assert result.step == STEPS and result.updates == STEPS and result.nonfinite_total == 0
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    first, last = np.mean([got[s] for s in range(1, 5)]), np.mean([got[s] for s in range(STEPS - 3, STEPS + 1)])
    print(f"loss: first 4 steps {first:.4f}, last 4 steps {last:.4f}")
    assert last < 0.85 * first
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        record = json.loads(f.readlines()[-1])
    for key in ("step", "loss", "grad_norm", "lr_pretrained", "lr_new", "steps_per_sec",
                "tokens_per_sec", "nonfinite_total"):
        assert key in record
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tensorboard")))
    # keep=3 of the saves at 8, 16, 24
    assert Checkpointer(workdir).all_steps() == [8, 16, 24]
    assert read_meta(workdir)["counters"]["step"] == STEPS


def test_resume_is_exact_including_data_order(uninterrupted, data_dir, tmp_path):
    workdir_a, _ = uninterrupted
    workdir = str(tmp_path / "run_b")
    first = train(tiny(data_dir), workdir, stop_at=10)
    assert first.step == 10 and first.preempted and first.last_checkpoint == 10
    second = train(tiny(data_dir), workdir)
    assert second.step == STEPS
    assert losses(workdir) == losses(workdir_a)          # bitwise, every step
    # step 16 was written asynchronously while training went on with donated buffers
    for step in (16, STEPS):
        a, b = flat(saved_params(workdir_a, step)), flat(saved_params(workdir, step))
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{step}: {name}")
    data = lambda w: open(os.path.join(w, "checkpoints", str(STEPS), "data",  # noqa: E731
                                       "process_0-of-1.json")).read()
    assert data(workdir) == data(workdir_a)


def signal_after_logging(monkeypatch, step: int, signum: int) -> None:
    """Sends `signum` to this process from the training loop itself, right after it logs
    `step`: deterministic, unlike a watcher thread racing the loop."""
    from tttjax.train.metrics import MetricsLogger

    log = MetricsLogger.log

    def log_then_signal(self, at, *args, **kwargs):
        out = log(self, at, *args, **kwargs)
        if at == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)


def test_sigterm_saves_the_current_step_and_the_run_resumes_exactly(uninterrupted, data_dir,
                                                                   tmp_path, monkeypatch):
    """Preemption: SIGTERM mid-run saves the step in flight; rerunning finishes identically."""
    assert threading.current_thread() is threading.main_thread()  # the handler lives here
    workdir_a, _ = uninterrupted
    workdir = str(tmp_path / "sigterm")
    handler_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        signal_after_logging(patch, 6, signal.SIGTERM)
        result = train(tiny(data_dir, checkpoint_every=4), workdir)
    assert result.preempted and 6 <= result.step < STEPS, result
    # no step is lost: the last logged step is the one saved, and it restores
    assert Checkpointer(workdir).latest_step() == result.step == max(losses(workdir))
    assert read_meta(workdir)["counters"]["step"] == result.step
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run put it back
    train(tiny(data_dir, checkpoint_every=4), workdir)
    assert losses(workdir) == losses(workdir_a)
    a, b = flat(saved_params(workdir_a, STEPS)), flat(saved_params(workdir, STEPS))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_meshes_agree_and_checkpoints_restore_on_another_mesh(uninterrupted, data_dir, tmp_path):
    workdir_a, _ = uninterrupted
    one = str(tmp_path / "one_device")
    train(tiny(data_dir, **{"mesh.num_devices": 1}), one, stop_at=4)
    three_d = str(tmp_path / "data_fsdp_tensor")
    axes = {"mesh.axes": {"data": 2, "fsdp": 2, "tensor": 2}}
    train(tiny(data_dir, **axes), three_d, stop_at=2)
    # resume the (2, 2, 2) checkpoint on the default (8, 1, 1) mesh
    train(tiny(data_dir), three_d, stop_at=4)
    ref, got, default = losses(one), losses(three_d), losses(workdir_a)
    print("1 device vs 2x2x2 -> 8x1x1 loss differences:",
          [abs(ref[s] - got[s]) for s in range(1, 5)])
    for s in range(1, 5):
        np.testing.assert_allclose(got[s], ref[s], rtol=2e-5)
        np.testing.assert_allclose(default[s], ref[s], rtol=2e-5)
    a, b = flat(saved_params(one, 4)), flat(saved_params(three_d, 4))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)

    # The (2, 2, 2) save restores bitwise onto a 1-device mesh and onto the 3D mesh.
    cfg = tiny(data_dir)
    arrays = {}
    for name, sizes, n in (("one", {"data": 1, "fsdp": 1, "tensor": 1}, 1),
                           ("3d", {"data": 2, "fsdp": 2, "tensor": 2}, 8)):
        mesh = make_mesh(sizes, devices=jax.devices()[:n])
        plan = _plan(cfg, mesh, config_lib.rules(cfg))
        params, opt_state, meta, _ = Checkpointer(three_d).restore(2, plan.spec.abstract,
                                                                   plan.abstract_opt)
        assert meta["counters"]["step"] == 2
        leaf = params["blocks"]["attn"]["to_q"]["kernel"]
        assert leaf.sharding == plan.spec.shardings["blocks"]["attn"]["to_q"]["kernel"]
        arrays[name] = flat(params)
    for key in arrays["one"]:
        np.testing.assert_array_equal(arrays["one"][key], arrays["3d"][key])


@pytest.mark.parametrize("mixer", registry.mixer_names())
def test_every_registered_mixer_trains_in_the_slot(mixer, data_dir, tmp_path):
    workdir = str(tmp_path / mixer)
    cfg = tiny(data_dir, mixer, **{"mesh.num_devices": 1, "train.global_batch_size": 2,
                                   "checkpoint_every": 1, "train.trainable": "mixer_qkvo"})
    result = train(cfg, workdir, stop_at=2)
    got = losses(workdir)
    assert result.nonfinite_total == 0 and all(np.isfinite(got[s]) for s in (1, 2))
    p1, p2 = flat(saved_params(workdir, 1)), flat(saved_params(workdir, 2))
    moved = {k for k in p1 if not np.array_equal(p1[k], p2[k])}
    assert any(k.startswith("blocks/mixer/mixer/") for k in moved), moved
    assert "blocks/mixer/alpha_fwd" in moved and "blocks/attn/to_q/kernel" in moved
    # frozen in this stage (docs/design.md §5, after 3 s): the MLP and the patch embedding
    assert "blocks/ff/proj_in/kernel" not in moved and "patch_proj/kernel" not in moved


def _one_device_plan(cfg):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return _plan(cfg, mesh, config_lib.rules(cfg)), mesh


def test_warm_start_from_converted_checkpoint_and_previous_stage(data_dir, tmp_path):
    # A "converted CogVideoX" checkpoint of the plain DiT (no mixer), in the convert format.
    base_plan, _ = _one_device_plan(tiny(data_dir, "none"))
    state = jax.tree.map(lambda x: x, base_plan.spec.template)
    base_params = base_plan.init_params()
    nnx.replace_by_pure_dict(state, base_params)
    converted = save_checkpoint(nnx.merge(base_plan.spec.graphdef, state), str(tmp_path / "conv"))

    cfg = tiny(data_dir, "ttt_linear", **{"mesh.num_devices": 1, "train.global_batch_size": 2,
                                          "checkpoint_every": 1, "train.trainable": "mixer_qkvo"})
    plan, mesh = _one_device_plan(cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(config_lib.rules(cfg)):
        params, report = load_params(plan.spec, converted, seed=cfg.seed, compiler_options=FAST)
    assert "mixer tensors initialised fresh" in report, report
    got, base, fresh = flat(params), flat(base_params), flat(plan.init_params())
    for name, value in got.items():
        # base weights from the checkpoint; the mixer exactly as a fresh initialisation
        np.testing.assert_array_equal(value, (fresh if name.startswith("blocks/mixer/") else base)[name],
                                      err_msg=name)
    assert params["blocks"]["mixer"]["alpha_fwd"].sharding == plan.spec.shardings["blocks"]["mixer"]["alpha_fwd"]

    # A run started from it, then stage chaining: the next stage starts from its latest params.
    stage_dir = str(tmp_path / "stage1")
    cfg.checkpoint.init_from = converted
    result = train(cfg, stage_dir, stop_at=2)
    assert result.step == 2
    with jax.set_mesh(mesh), nnx.logical_axis_rules(config_lib.rules(cfg)):
        chained, report = load_params(plan.spec, stage_dir, seed=0)
    assert "0 mixer tensors initialised fresh" in report, report
    saved = flat(saved_params(stage_dir, 2))
    for name, value in flat(chained).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)

    # A checkpoint of another architecture is refused by name.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_config.json").write_text(json.dumps(cfg.model.to_dict()))
    writer = ocp.StandardCheckpointer()
    writer.save(str(bad / "state"), {"patch_proj": {"kernel": {"value": np.zeros((3, 3), np.float32)}}})
    writer.wait_until_finished()
    with pytest.raises(ValueError, match="shape mismatches .*patch_proj/kernel"):
        load_params(plan.spec, str(bad), seed=0)


def test_toon_base_export_is_float16_and_warm_starts_the_ttt_model(uninterrupted, data_dir,
                                                                    tmp_path, capsys):
    """`python -m tttjax.models.toon_base --export`: the newest checkpoint of a plain-DiT run,
    rounded to float16, loads into the TTT model with only the mixer fresh (the demo's start)."""
    from tttjax.models import toon_base

    workdir, _ = uninterrupted
    out = tmp_path / "base"
    assert toon_base.main(["--export", workdir, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == STEPS and printed["parameters"] > 0
    info = toon_base.read_info(str(out))
    assert info["step"] == STEPS and info["model"]["mixer"] == "none"
    assert info["loss"] == losses(workdir)[STEPS]
    stored = ocp.PyTreeCheckpointer().restore(toon_base.params_dir(str(out)))
    assert all(a.dtype == np.float16 for a in jax.tree.leaves(stored))

    cfg = tiny(data_dir, "ttt_mlp", **{"mesh.num_devices": 1})
    plan, mesh = _one_device_plan(cfg)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(config_lib.rules(cfg)):
        params, report = load_params(plan.spec, toon_base.params_dir(str(out)), seed=cfg.seed,
                                     compiler_options=FAST)
    assert "20 mixer tensors initialised fresh" in report, report
    saved, fresh = flat(saved_params(workdir, STEPS)), flat(plan.init_params())
    for name, value in flat(params).items():
        assert value.dtype == np.float32, name
        want = fresh[name] if name.startswith("blocks/mixer/") else \
            saved[name].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(value, want, err_msg=name)

    # A second export replaces the first whole; a folder that is no run is refused in one line.
    assert toon_base.main(["--export", workdir, "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    capsys.readouterr()
    assert toon_base.main(["--export", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a training workdir" in err and "--config toon_base" in err and "\n" not in err
    with pytest.raises(ValueError, match="holds no exported toon base"):
        toon_base.params_dir(str(tmp_path))


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(data_dir, tmp_path, monkeypatch):
    original = data_loader.ToonToModelInputs.map
    calls = {"n": 0}

    def first_batch_nan(self, example):
        out = original(self, example)
        calls["n"] += 1
        if calls["n"] <= 8:  # the first global batch
            out["latents"] = np.full_like(out["latents"], np.nan)
        return out

    monkeypatch.setattr(data_loader.ToonToModelInputs, "map", first_batch_nan)
    workdir = str(tmp_path / "nan_once")
    cfg = tiny(data_dir, **{"checkpoint_every": 1})
    result = train(cfg, workdir, stop_at=3)
    got = losses(workdir)
    assert result.nonfinite_total == 1 and result.updates == 2
    assert got[1] is None and np.isfinite(got[2]) and np.isfinite(got[3])
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    fresh = flat(_plan(cfg, mesh, config_lib.rules(cfg)).init_params())
    after_bad = flat(saved_params(workdir, 1))
    for name in fresh:  # the skipped step left the parameters untouched
        np.testing.assert_array_equal(after_bad[name], fresh[name], err_msg=name)

    monkeypatch.setattr(data_loader.ToonToModelInputs, "map",
                        lambda self, ex: {k: np.full_like(v, np.nan) if k == "latents" else v
                                          for k, v in original(self, ex).items()})
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        train(tiny(data_dir, **{"train.max_nonfinite_in_a_row": 3}), str(tmp_path / "nan_always"))


def test_invalid_configs_are_refused_before_compiling(data_dir):
    cases = [
        ({"train.trainable": "mixer"}, "trains the mixer"),
        ({"train.global_batch_size": 6, "train.grad_accum_steps": 4}, "divisible by grad_accum_steps"),
        ({"stage.latent_frames": 7}, "latent_frames"),
        ({"data.builder_config": "small"}, "frames_per_segment must be 4"),
        ({"optim.new.schedule": "linear"}, "schedule"),
        ({"mesh.axes": {"data": -1, "fsdp": -1}}, "at most one axis"),
        ({"mesh.rules": (("activation_length", "tensr"),)}, r"names mesh axes \['tensr'\]"),
        ({"mesh.rules": ("length",)}, "a \\(logical axis, mesh axes\\) pair"),
        ({"diffusion.beta_end": 2.0}, "config.diffusion"),
        ({"checkpoint.init_from": "/nonexistent/ckpt"}, "does not exist"),
    ]
    for over, message in cases:
        with pytest.raises(ValueError, match=message):
            config_lib.validate(tiny(data_dir, **over))
    with pytest.raises(ValueError, match="divisible by the 8 batch shards"):
        config_lib.validate_mesh(tiny(data_dir, **{"train.global_batch_size": 4}), 8)


def test_mesh_rules_override_the_defaults(data_dir):
    """config.mesh.rules states only what changes; every other default rule stays."""
    rules = dict(config_lib.rules(tiny(data_dir, **{"mesh.rules": (
        ("activation_length", "tensor"), ("extra", ("data", "fsdp")))})))
    defaults = dict(shd.DEFAULT_RULES)
    assert rules.pop("activation_length") == "tensor" and rules.pop("extra") == ("data", "fsdp")
    assert rules == {k: v for k, v in defaults.items() if k != "activation_length"}
    assert dict(config_lib.rules(tiny(data_dir))) == defaults
    # The retired name of the sequence axis is refused, naming its replacement: appended, it
    # would match no constraint and leave the sequence unsharded.
    with pytest.raises(ValueError, match=r"now \('activation_length', \.\.\.\)"):
        config_lib.rules(tiny(data_dir, **{"mesh.rules": (("length", "tensor"),)}))


@pytest.mark.slow
def test_trains_on_precomputed_latents(tmp_path):
    """The `latents` dataset end to end: packed from .npz sources, posterior sampled in the step."""
    from tttjax.data import latents as latents_lib

    geometry = dict(latent_channels=4, text_length=8, text_embed_dim=32, frames_per_segment=2,
                    prefix_frames=1, scaling_factor=0.7)
    lcfg = latents_lib.LatentsConfig(name="src", **geometry)
    rng = np.random.default_rng(0)
    for i, n in enumerate((2, 3, 2, 2)):
        latents_lib.write_source_example(
            str(tmp_path / "manual" / "train" / f"video{i}.npz"), config=lcfg,
            latents_mean=rng.standard_normal((1 + 2 * n, 4, 8, 8)),
            latents_logvar=np.full((1 + 2 * n, 4, 8, 8), -4.0),
            text=rng.standard_normal((n, 8, 32)), scene_start=np.arange(n) == 0,
            scene_end=np.arange(n) == n - 1, captions=[f"segment {j}" for j in range(n)])
    cfg = tiny(str(tmp_path / "tfds"), **{
        "data.dataset": "latents", "data.builder_config": "cogvideox5b",
        "data.builder_overrides": geometry, "data.manual_dir": str(tmp_path / "manual"),
        "mesh.num_devices": 1, "train.global_batch_size": 2})
    workdir = str(tmp_path / "run")
    result = train(cfg, workdir, stop_at=3)
    got = losses(workdir)
    assert result.step == 3 and all(np.isfinite(got[s]) for s in (1, 2, 3))
    assert any(d.startswith("cogvideox5b_") for d in os.listdir(tmp_path / "tfds" / "latents"))
