"""The optimiser: parameter groups from paths, stage masks, decay mask, schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tttjax.sharding import make_mesh
from tttjax.train import optimizer as opt


def _params():
    """A DiT-shaped parameter tree (paths as in CogVideoXDiT with a mixer)."""
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "patch_proj": {"kernel": n(16, 8), "bias": n(8)},
        "norm_final": {"scale": n(8), "bias": n(8)},
        "blocks": {
            "attn": {"to_q": {"kernel": n(2, 8, 2, 4), "bias": n(2, 2, 4)},
                     "to_out": {"kernel": n(2, 2, 4, 8), "bias": n(2, 8)},
                     "norm_q": {"scale": n(2, 4), "bias": n(2, 4)}},
            "ff": {"proj_in": {"kernel": n(2, 8, 32), "bias": n(2, 32)}},
            "mixer": {"alpha_fwd": n(2, 2, 8),
                      "mixer": {"wq": {"kernel": n(2, 8, 8), "bias": n(2, 8)},
                                "W1": n(2, 2, 4, 16), "b1": n(2, 2, 1, 16),
                                "ln_weight": n(2, 2, 4), "post_norm": {"scale": n(2, 8)}}},
        },
    }


def _optim(**over):
    cfg = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip=0.1, mu_dtype="",
        pretrained=dict(lr=1e-5, schedule="constant", warmup_steps=0, final_lr_fraction=0.0),
        new=dict(lr=1e-4, schedule="cosine", warmup_steps=0, final_lr_fraction=0.0)))
    cfg.update(over)
    return cfg


def _flat(tree):
    return {"/".join(opt.path_names(p)): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_labels_trainable_sets_and_decay_from_paths():
    params = _params()
    labels = _flat(opt.param_labels(params, "all"))
    assert labels["blocks/mixer/mixer/W1"] == "new" and labels["blocks/mixer/alpha_fwd"] == "new"
    assert labels["blocks/attn/to_q/kernel"] == "pretrained" and labels["patch_proj/bias"] == "pretrained"
    qkvo = _flat(opt.param_labels(params, "mixer_qkvo"))
    assert qkvo["blocks/attn/to_out/bias"] == "pretrained" and qkvo["blocks/mixer/mixer/b1"] == "new"
    assert qkvo["blocks/ff/proj_in/kernel"] == "frozen" and qkvo["blocks/attn/norm_q/scale"] == "frozen"
    assert qkvo["patch_proj/kernel"] == "frozen"
    with_norms = _flat(opt.param_labels(params, "mixer_qkvo_norms"))   # the seed code's set
    assert {k for k, v in with_norms.items() if v != "frozen"} == {
        k for k, v in qkvo.items() if v != "frozen"} | {"blocks/attn/norm_q/scale",
                                                        "blocks/attn/norm_q/bias"}
    assert with_norms["blocks/attn/norm_q/scale"] == "pretrained"
    mixer_only = _flat(opt.param_labels(params, "mixer"))
    assert {k for k, v in mixer_only.items() if v != "frozen"} == {
        k for k in labels if k.startswith("blocks/mixer/")}
    decay = _flat(opt.decay_mask(params))
    assert {k for k, v in decay.items() if v} == {
        "patch_proj/kernel", "blocks/attn/to_q/kernel", "blocks/attn/to_out/kernel",
        "blocks/ff/proj_in/kernel", "blocks/mixer/mixer/wq/kernel", "blocks/mixer/mixer/W1"}
    with pytest.raises(ValueError, match="trainable set"):
        opt.param_labels(params, "everything")


def test_schedules():
    const = opt.make_schedule(1.0, "constant", 4, 100)
    np.testing.assert_allclose([float(const(c)) for c in (0, 1, 3, 50)], [0.25, 0.5, 1.0, 1.0])
    cos = opt.make_schedule(2.0, "cosine", 10, 110, final_lr_fraction=0.1)
    np.testing.assert_allclose(float(cos(9)), 2.0)
    np.testing.assert_allclose(float(cos(60)), 2.0 * (0.1 + 0.9 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(float(cos(110)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(cos(500)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(opt.make_schedule(3.0, "cosine", 0, 10)(0)), 3.0)


def test_groups_get_their_rates_frozen_stay_put_and_decay_is_masked():
    params = _params()
    tx, _ = opt.make_optimizer(_optim(), params, trainable="mixer_qkvo", total_steps=100)
    state = jax.jit(tx.init)(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    upd = _flat(updates)
    # Adam's first step moves every element by lr (the gradient sign), plus decoupled decay.
    p = _flat(params)
    np.testing.assert_allclose(upd["blocks/attn/to_out/bias"], -1e-5, rtol=1e-4)
    np.testing.assert_allclose(upd["blocks/mixer/mixer/b1"], -1e-4, rtol=1e-4)
    np.testing.assert_allclose(upd["blocks/mixer/mixer/W1"],
                               -1e-4 * (1 + 1e-4 * p["blocks/mixer/mixer/W1"]), rtol=1e-4)
    for name in ("blocks/ff/proj_in/kernel", "patch_proj/kernel", "blocks/attn/norm_q/scale"):
        assert not np.asarray(upd[name]).any(), name
    # no optimiser state is kept for frozen parameters
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_trained = sum(v.size for k, v in p.items()
                    if _flat(opt.param_labels(params, "mixer_qkvo"))[k] != "frozen")
    assert n_state == 2 * n_trained + 4  # mu, nu per trained scalar; Adam + schedule counts x 2 groups


def _adam_reference(grads_per_step, *, clip, b1=0.9, b2=0.95, eps=1e-8):
    """Float64 NumPy AdamW (lr 1, no decay) on gradients clipped to a global norm `clip`
    (None: unclipped); returns the last step's updates, leaf by leaf."""
    m = v = None
    for t, grads in enumerate(grads_per_step, start=1):
        g = [np.asarray(x, np.float64) for x in grads]
        norm = np.sqrt(sum(np.sum(x * x) for x in g))
        if clip is not None and norm > clip:
            g = [x * clip / norm for x in g]
        m = [(1 - b1) * x for x in g] if m is None else [b1 * a + (1 - b1) * x for a, x in zip(m, g)]
        v = [(1 - b2) * x * x for x in g] if v is None else [b2 * a + (1 - b2) * x * x
                                                             for a, x in zip(v, g)]
        out = [-(a / (1 - b1 ** t)) / (np.sqrt(c / (1 - b2 ** t)) + eps) for a, c in zip(m, v)]
    return out


def test_gradients_are_clipped_to_the_global_norm_before_adam():
    """Two steps, a large gradient then a small one: Adam's second update depends on how much
    the first was clipped, and on the norm being global (both leaves together), so removing
    `grad_clip`, or clipping leaf by leaf, changes it."""
    params = {"a": {"kernel": jnp.ones((3,))}, "b": {"kernel": jnp.ones((2,))}}
    constant = dict(lr=1.0, schedule="constant", warmup_steps=0, final_lr_fraction=0.0)
    tx, _ = opt.make_optimizer(_optim(weight_decay=0.0, pretrained=constant, new=constant),
                               params, trainable="all", total_steps=10)
    steps = [([30.0, 40.0, 0.0], [0.0, 120.0]), ([0.01, -0.02, 0.03], [0.02, 0.01])]
    state = tx.init(params)
    for a, b in steps:
        grads = {"a": {"kernel": jnp.array(a)}, "b": {"kernel": jnp.array(b)}}
        updates, state = tx.update(grads, state, params)
    got = [np.asarray(updates["a"]["kernel"]), np.asarray(updates["b"]["kernel"])]
    want = _adam_reference(steps, clip=0.1)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    # The check can fail: without the clip the second update is far from the clipped one.
    unclipped = _adam_reference(steps, clip=None)
    assert max(np.abs(u - w).max() for u, w in zip(unclipped, want)) > 0.1


def test_optimizer_state_is_sharded_like_the_parameters():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = _params()
    p_sh = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec("fsdp")), params)
    p_sh["blocks"]["mixer"]["mixer"]["b1"] = NamedSharding(mesh, PartitionSpec("tensor"))
    tx, _ = opt.make_optimizer(_optim(), params, trainable="mixer_qkvo", total_steps=10)
    rep = NamedSharding(mesh, PartitionSpec())
    sh = opt.optimizer_shardings(jax.eval_shape(tx.init, params), p_sh, rep)
    flat = _flat(sh)
    mu = [k for k in flat if k.endswith("mu/blocks/mixer/mixer/W1")]
    assert mu and flat[mu[0]].spec == PartitionSpec("fsdp")
    nu = [k for k in flat if k.endswith("nu/blocks/mixer/mixer/b1")]
    assert nu and flat[nu[0]].spec == PartitionSpec("tensor")
    counts = [k for k in flat if k.endswith("count")]
    assert counts and all(flat[k] == rep for k in counts)


def test_5b_stage_schedules_end_where_the_recipe_says():
    """3 s: new parameters cosine 1e-4 -> 1e-5 (docs/design.md §5, §8); later stages 1e-5."""
    from tttjax.command_line import load_config

    for stage, start, end in (("3s", 1e-4, 1e-5), ("9s", 1e-5, 1e-5)):
        config = load_config(f"cogvideox_5b:{stage},ttt_mlp")
        g = config.optim.new
        schedule = opt.make_schedule(g.lr, g.schedule, g.warmup_steps, config.steps,
                                     g.final_lr_fraction)
        np.testing.assert_allclose(float(schedule(g.warmup_steps)), start, rtol=1e-6)
        np.testing.assert_allclose(float(schedule(config.steps)), end, rtol=1e-5)
