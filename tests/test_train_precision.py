"""float32 master weights: the 5B precision settings (bf16 compute, float32 parameters).

At the 5B learning rates an AdamW step (about lr in size) is far below the rounding step of a
bf16 weight (2^-8..2^-7 of its magnitude), so a run that stores parameters in bf16 loses
almost every update. The runs below train the tiny DiT (configs/tiny.py) at the 5B settings
(model.dtype bfloat16, optim.mu_dtype float32, both groups at lr 1e-5, no warmup) with
float32 and with bfloat16 storage on a 2-device fsdp mesh, and check that:
  - float32 storage moves most weights and bfloat16 storage does not (the test discriminates);
  - checkpoints hold float32 parameters and Adam moments; resume stays bitwise exact;
  - bf16 storage warns at start-up, the 5B config does not;
  - float32 parameters add no float32 activation (traced train step with the TTT-MLP mixer,
    nothing compiled) and the mixer's per-token gates get float32-accumulated gradients.
The plain DiT keeps the two compiles cheap (about 7 s of CPU each instead of 17 s with the
TTT-MLP mixer); the mixer's dtypes are covered by the traced step.
"""

import collections
import json
import os
import warnings

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tiny_configs import load_config, tiny_config

from tttjax.layers.bidirectional import GatedBidirectional
from tttjax.sharding import make_mesh
from tttjax.train import config as config_lib
from tttjax.train import train
from tttjax.train.config import LowPrecisionStorageWarning
from tttjax.train.loop import _plan, train_step_setup
from tttjax.train.optimizer import path_names
from tttjax.train.step import COUNTERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
LR = 1e-5


def precision_config(data_dir, storage, mixer="none"):
    """configs/tiny.py at the 5B precision settings, parameters stored in `storage`."""
    cfg = tiny_config(mixer)
    cfg.steps, cfg.log_every, cfg.checkpoint_every = STEPS, 1, STEPS
    cfg.data.data_dir = data_dir
    cfg.data.builder_overrides = dict(num_train=16, num_validation=0)
    cfg.train.global_batch_size = 2
    cfg.mesh.axes = {"data": 1, "fsdp": 2, "tensor": 1}
    cfg.mesh.num_devices = 2
    cfg.model.dtype, cfg.model.param_dtype = "bfloat16", storage
    cfg.optim.mu_dtype = "float32"
    for group in (cfg.optim.pretrained, cfg.optim.new):
        group.lr, group.schedule, group.warmup_steps = LR, "constant", 0
    return cfg


def flat(tree):
    return {"/".join(path_names(p)): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def checkpoint_item(workdir, step, item):
    return os.path.join(workdir, "checkpoints", str(step), item)


def stored_dtypes(directory):
    """{name: dtype} of the arrays an Orbax item holds, from its metadata (nothing restored)."""
    meta = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {name: np.dtype(m.dtype) for name, m in flat_meta(tree).items()
            if getattr(m, "dtype", None) is not None}


def flat_meta(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "dtype") and hasattr(x, "shape"))[0]
    return {"/".join(path_names(p)): m for p, m in leaves}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """storage -> (workdir, initial parameters, warnings raised by `train`), trained lazily."""
    done = {}

    def run(storage):
        if storage not in done:
            cfg = precision_config(data_dir, storage)
            workdir = str(tmp_path_factory.mktemp(f"run_{storage}"))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(cfg, workdir)
            mesh = make_mesh(config_lib.validate_mesh(cfg, 2), devices=jax.devices()[:2])
            rules = config_lib.rules(cfg)
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                initial = flat(_plan(cfg, mesh, rules).init_params())  # the run's (same seed)
            done[storage] = workdir, initial, [w for w in caught
                                               if issubclass(w.category, LowPrecisionStorageWarning)]
        return done[storage]
    return run


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_small_updates_move_the_weights_only_with_float32_storage(runs, storage):
    workdir, initial, _ = runs(storage)
    trained = flat(ocp.PyTreeCheckpointer().restore(checkpoint_item(workdir, STEPS, "params")))
    moved = sum(int(np.sum(trained[k] != initial[k])) for k in initial)
    total = sum(v.size for v in initial.values())
    fraction = moved / total
    print(f"{storage} storage, lr {LR}, {STEPS} steps: {fraction:.1%} of {total} weights moved")
    assert all(np.isfinite(v) for v in losses(workdir).values())
    if storage == "float32":
        assert fraction >= 0.8
    else:  # the updates round away: what moves is mostly biases that start at zero
        assert fraction < 0.3


def test_checkpoints_hold_float32_parameters_and_moments(runs):
    workdir, _, _ = runs("float32")
    params = stored_dtypes(checkpoint_item(workdir, STEPS, "params"))
    assert params and set(params.values()) == {np.dtype(np.float32)}, params
    opt = stored_dtypes(checkpoint_item(workdir, STEPS, "opt_state"))
    moments = {k: v for k, v in opt.items() if "/mu/" in f"/{k}/" or "/nu/" in f"/{k}/"}
    assert len(moments) == 2 * len(params), sorted(opt)
    assert set(moments.values()) == {np.dtype(np.float32)}, moments


def test_resume_is_bitwise_exact_with_float32_master_weights(runs, data_dir, tmp_path):
    workdir_a, _, _ = runs("float32")
    workdir = str(tmp_path / "resumed")
    first = train(precision_config(data_dir, "float32"), workdir, stop_at=2)
    assert first.step == 2 and first.preempted
    train(precision_config(data_dir, "float32"), workdir)
    assert losses(workdir) == losses(workdir_a)
    a, b = (flat(ocp.PyTreeCheckpointer().restore(checkpoint_item(w, STEPS, "params")))
            for w in (workdir_a, workdir))
    for name in a:
        assert b[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bf16_storage_warns_at_start_up(runs):
    _, _, caught = runs("bfloat16")
    assert len(caught) == 1 and "config.model.param_dtype" in str(caught[0].message)
    _, _, caught = runs("float32")
    assert not caught
    for stage in ("3s", "63s"):
        cfg = load_config(f"cogvideox_5b:{stage},ttt_mlp")
        assert (cfg.model.dtype, cfg.model.param_dtype, cfg.optim.mu_dtype) == (
            "bfloat16", "float32", "float32")
        with warnings.catch_warnings():
            warnings.simplefilter("error", LowPrecisionStorageWarning)
            config_lib.validate(cfg)


def _float32_shapes(jaxpr, out):
    """Shapes of every float32 value a jaxpr computes, nested jaxprs (scan, remat) included."""
    for eqn in jaxpr.eqns:
        out.extend(v.aval.shape for v in eqn.outvars
                   if getattr(v.aval, "dtype", None) == jnp.float32)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex.ClosedJaxpr):
                    _float32_shapes(sub.jaxpr, out)
                elif isinstance(sub, jex.Jaxpr):
                    _float32_shapes(sub, out)
    return out


def test_float32_parameters_add_no_float32_activations(data_dir):
    """The train step (TTT-MLP mixer, the 3 s stage's remat policy), traced for both storages:
    every float32 value that only float32 storage computes is shaped like a parameter (its
    cast to bf16, its float32 gradient, the optimiser's update), whole or one layer of it.
    The saved block activations are among the traced values (the scan's stacked residuals),
    and so are the mixer's per-token gates."""
    shapes, param_shapes = {}, set()
    for storage in ("float32", "bfloat16"):
        cfg = precision_config(data_dir, storage, mixer="ttt_mlp")
        cfg.model.remat_policy = "save_block_outputs"
        mesh = make_mesh(config_lib.validate_mesh(cfg, 2), devices=jax.devices()[:2])
        rules = config_lib.rules(cfg)
        setup = train_step_setup(cfg, mesh, rules)
        rep = NamedSharding(mesh, PartitionSpec())
        counters = {k: jax.ShapeDtypeStruct((), jnp.int32, sharding=rep) for k in COUNTERS}
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=setup.batch_shardings[k])
                 for k, shape in setup.batch_shapes.items()}
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            traced = setup.plan.step_fn.trace(setup.plan.spec.abstract, setup.plan.abstract_opt,
                                              counters, batch)
        shapes[storage] = collections.Counter(_float32_shapes(traced.jaxpr.jaxpr, []))
        leaves = jax.tree.leaves(setup.plan.spec.abstract)
        param_shapes |= {p.shape for p in leaves} | {p.shape[1:] for p in leaves}
    extra = shapes["float32"] - shapes["bfloat16"]
    assert extra, "float32 storage should at least add float32 gradients"
    not_params = {s: n for s, n in extra.items() if s not in param_shapes}
    assert not not_params, f"float32 values that only float32 storage creates: {not_params}"


class _Identity(nnx.Module):
    """A mixer without parameters, so the gates' gradient has a closed form."""

    def __call__(self, x, *, rope=None):
        return x


def test_gate_gradients_accumulate_in_float32():
    """A gate's gradient sums over every token of its modality. Summed in bf16 (the scatter-add
    of a gather) it stalls at a few hundred once the sum outgrows its terms; the layer must
    accumulate it in float32 whatever the compute dtype."""
    length, width = 4096, 8
    gates = GatedBidirectional(_Identity(), width, param_dtype=jnp.float32)
    modality = jnp.asarray(np.arange(length) >= 64, jnp.int32)
    x = jnp.ones((1, length, width), jnp.bfloat16)
    graphdef, state = nnx.split(gates)

    @jax.jit
    def grads(state, x):
        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(x, modality=modality).astype(jnp.float32))
        return jax.grad(loss)(state)

    got = np.asarray(grads(state, x)["alpha_fwd"][...])
    assert got.dtype == np.float32
    # out = z * (1 + tanh(b)), z = x * (1 + tanh(a)): d out / d a = x (1 + tanh(b)) sech^2(a)
    per_token = (1 + np.tanh(0.1)) * (1 - np.tanh(0.1) ** 2)
    want = np.array([64, length - 64])[:, None] * per_token * np.ones((1, width))
    np.testing.assert_allclose(got, want, rtol=1e-2)
