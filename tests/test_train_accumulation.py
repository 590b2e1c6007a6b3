"""Gradient accumulation inside the train step (`train.grad_accum_steps`).

One step is one optimiser update over the global batch whatever the accumulation: the step
draws the objective's randomness for the whole batch, splits it into k micro-batches and
averages their float32 gradients. So k = 2 and k = 4 must give the update of k = 1 (up to
summation order), with only the trainable leaves accumulated; `grad_accum_steps = 0` picks
one example per batch shard. Tiny DiT on 2 fake CPU devices (fsdp 2), batch 8.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_configs import load_config, tiny_config

from tttjax.sharding import make_mesh
from tttjax.train import config as config_lib
from tttjax.train.loop import train_step_setup
from tttjax.train.step import initial_counters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(mixer="none", **overrides):
    return tiny_config(mixer, **{"train.global_batch_size": 8,
                                 "mesh.axes": {"data": 1, "fsdp": 2, "tensor": 1},
                                 "mesh.num_devices": 2, **overrides})


def one_step(cfg, perturb=None):
    """(resolved accumulation, loss, grad_norm, counters, parameters after one step) from the
    config's initial parameters on a fixed random batch."""
    mesh = make_mesh(config_lib.validate_mesh(cfg, 2), devices=jax.devices()[:2])
    rules = config_lib.rules(cfg)
    setup = train_step_setup(cfg, mesh, rules)
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal(setup.batch_shapes[k]).astype(np.float32)
            for k in setup.batch_shardings}
    if perturb is not None:
        host["latents"][perturb] += 1.0
    batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in host.items()}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        params = setup.plan.init_params()
        opt_state = setup.plan.init_opt(params)
        params, _, counters, metrics = setup.plan.step_fn(params, opt_state, initial_counters(),
                                                          batch)
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    return (setup.config.train.grad_accum_steps, float(metrics["loss"]),
            float(metrics["grad_norm"]), {k: int(v) for k, v in counters.items()}, flat)


@pytest.fixture(scope="module")
def reference():
    return one_step(tiny())


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_step_equals_the_whole_batch_step(reference, accum):
    _, loss1, norm1, _, params1 = reference
    k, loss, norm, counters, params = one_step(tiny(**{"train.grad_accum_steps": accum}))
    assert k == accum
    # float32 sums in another order: equal to ~1e-6 relative; a wrong average (sum instead
    # of mean, one micro-batch only, other noise) is off by far more.
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    np.testing.assert_allclose(norm, norm1, rtol=1e-4)
    assert counters["step"] == 1 and counters["updates"] == 1
    for name, p in params.items():
        np.testing.assert_allclose(p, params1[name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_the_last_micro_batch_counts(reference):
    """Example 7 is in the last shard's share of the second micro-batch (2 batch shards of
    4 rows, k = 2): changing it changes the accumulated loss."""
    k, loss, *_ = one_step(tiny(**{"train.grad_accum_steps": 2}), perturb=7)
    assert k == 2 and not np.isclose(loss, reference[1], rtol=1e-4)


def test_frozen_parameters_stay_put_with_accumulation():
    cfg = tiny("swa", **{"train.grad_accum_steps": 2, "train.trainable": "mixer_qkvo"})
    ref = one_step(tiny("swa", **{"train.trainable": "mixer_qkvo"}))
    k, loss, norm, _, params = one_step(cfg)
    np.testing.assert_allclose(loss, ref[1], rtol=1e-5)
    np.testing.assert_allclose(norm, ref[2], rtol=1e-4)
    for name, p in params.items():
        np.testing.assert_allclose(p, ref[4][name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_automatic_accumulation_puts_one_example_on_each_batch_shard():
    cfg = tiny(**{"train.grad_accum_steps": 0})
    config_lib.validate(cfg)
    resolved = config_lib.resolve_accumulation(cfg, {"data": 2, "fsdp": 2, "tensor": 1})
    assert resolved.train.grad_accum_steps == 2 and cfg.train.grad_accum_steps == 0
    assert config_lib.micro_batch_size(resolved) == 4
    assert config_lib.resolve_accumulation(cfg, {"data": 8, "fsdp": 1, "tensor": 1}
                                           ).train.grad_accum_steps == 1
    with pytest.raises(ValueError, match="multiple of the 16 batch shards"):
        config_lib.resolve_accumulation(cfg, {"data": 4, "fsdp": 4, "tensor": 1})
    with pytest.raises(ValueError, match="automatic"):
        config_lib.micro_batch_size(cfg)


def test_the_5b_config_accumulates_automatically():
    cfg = load_config("cogvideox_5b:63s,ttt_mlp")
    assert cfg.train.grad_accum_steps == 0 and cfg.train.global_batch_size == 64
    on_128 = config_lib.resolve_accumulation(cfg, {"data": 4, "fsdp": 8, "tensor": 4})
    on_256 = config_lib.resolve_accumulation(cfg, {"data": 8, "fsdp": 8, "tensor": 4})
    assert (on_128.train.grad_accum_steps, on_256.train.grad_accum_steps) == (2, 1)
