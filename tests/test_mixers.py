"""Baseline mixer layers and the registry: NumPy float64 compositions from each layer's
parameters, causality, the two-way wrapper, jit/grad, and a heads-sharded 8-device mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from recurrence_reference import delta_rule_reference, ssd_reference
from tttjax import sharding
from tttjax.layers import registry
from tttjax.layers.attention_mixers import FullAttention, LocalAttention, SlidingWindowAttention
from tttjax.layers.gated_deltanet import GatedDeltaNet
from tttjax.layers.mamba2 import Mamba2
from tttjax.ops.rope import rope_1d

WIDTH, HEADS, LENGTH = 32, 4, 21


def perturb(layer, seed, scale=0.3):
    """Moves parameters off their init so the comparison exercises every one of them."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            var[...] = var[...] + scale * jnp.asarray(rng.standard_normal(var.shape), var.dtype)


def P(v):  # noqa: N802
    return np.asarray(v[...], np.float64)


def np_conv(y, kernel, bias=None):
    k = kernel.shape[0]
    yp = np.pad(y, ((0, 0), (k - 1, 0), (0, 0)))
    out = sum(yp[:, j:j + y.shape[1]] * kernel[j] for j in range(k))
    return out if bias is None else out + bias


def silu(y):
    return y / (1 + np.exp(-y))


def softplus(y):
    return np.log1p(np.exp(y))


def heads(y, h):
    b, length, _ = y.shape
    return y.reshape(b, length, h, -1).transpose(0, 2, 1, 3)


def np_gated_deltanet(layer, x):
    h = layer.num_heads
    lin = lambda m: x @ P(m.kernel)  # noqa: E731
    l2 = lambda a: a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
    q = l2(heads(silu(np_conv(lin(layer.q_proj), P(layer.q_conv))), h))
    k = l2(heads(silu(np_conv(lin(layer.k_proj), P(layer.k_conv))), h))
    v = heads(silu(np_conv(lin(layer.v_proj), P(layer.v_conv))), h)
    beta = (1 / (1 + np.exp(-lin(layer.b_proj)))).transpose(0, 2, 1)
    g = (-np.exp(P(layer.A_log)) * softplus(lin(layer.a_proj) + P(layer.dt_bias))).transpose(0, 2, 1)
    o = delta_rule_reference(q, k, v, g, beta)[0].transpose(0, 2, 1, 3)
    gate = lin(layer.g_proj).reshape(o.shape)
    o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-5) * P(layer.o_norm_weight) * silu(gate)
    return o.reshape(x.shape[0], x.shape[1], -1) @ P(layer.o_proj.kernel)


def np_mamba2(layer, x):
    h, g = layer.num_heads, layer.ngroups
    b, length, _ = x.shape
    lin = lambda m: x @ P(m.kernel)  # noqa: E731
    xs = silu(np_conv(lin(layer.x_proj), P(layer.x_conv), P(layer.x_conv_bias)))
    bc = silu(np_conv(lin(layer.bc_proj), P(layer.bc_conv), P(layer.bc_conv_bias)))
    b_mat, c_mat = np.split(bc, 2, axis=-1)
    b_mat, c_mat = (heads(t, g) for t in (b_mat, c_mat))            # [B, G, L, N]
    dt = softplus(lin(layer.dt_proj) + P(layer.dt_bias)).transpose(0, 2, 1)
    xh = heads(xs, h)
    y = ssd_reference(xh, dt, -np.exp(P(layer.A_log)), b_mat, c_mat)[0] + P(layer.D)[:, None, None] * xh
    y = y.transpose(0, 2, 1, 3).reshape(b, length, g, -1) * silu(lin(layer.z_proj).reshape(b, length, g, -1))
    y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + 1e-5) * P(layer.norm_weight).reshape(g, -1)
    return y.reshape(b, length, -1) @ P(layer.out_proj.kernel)


def np_attention_mixer(layer, x, mask, rope):
    h = layer.num_heads
    lin = lambda m: x @ P(m.kernel) + P(m.bias)  # noqa: E731

    def ln(a, scale, bias):
        mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
        return (a - mu) / np.sqrt(var + 1e-6) * P(scale) + P(bias)

    def rot(a):
        cos, sin = (np.asarray(t, np.float64) for t in rope)
        pairs = a.reshape(*a.shape[:-1], -1, 2)
        return a * cos + np.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(a.shape) * sin

    q = rot(ln(heads(lin(layer.wq), h), layer.q_norm_scale, layer.q_norm_bias))
    k = rot(ln(heads(lin(layer.wk), h), layer.k_norm_scale, layer.k_norm_bias))
    v = heads(lin(layer.wv), h)
    s = np.where(mask, q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]), -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    y = (pr / pr.sum(-1, keepdims=True)) @ v
    y = y.transpose(0, 2, 1, 3).reshape(x.shape)
    return y @ P(layer.wo.kernel) + P(layer.wo.bias)


@nnx.jit
def jit_call(mixer, x, rope=None):
    return mixer(x, rope=rope)


def inputs(seed=0, batch=2, length=LENGTH):
    return jax.random.normal(jax.random.key(seed), (batch, length, WIDTH), jnp.float32)


def test_gated_deltanet_matches_numpy_composition():
    layer = GatedDeltaNet(WIDTH, HEADS, expand_v=1.5, chunk_size=8, rngs=nnx.Rngs(0))
    perturb(layer, 1)
    x = inputs()
    np.testing.assert_allclose(jit_call(layer, x), np_gated_deltanet(layer, np.asarray(x, np.float64)),
                               rtol=2e-4, atol=2e-5)


def test_mamba2_matches_numpy_composition():
    layer = Mamba2(WIDTH, HEADS, d_state=8, ngroups=2, chunk_size=8, rngs=nnx.Rngs(0))
    assert layer.num_heads == 8 and layer.head_dim == 8           # expand 2 * 32 / (32 / 4)
    perturb(layer, 2, scale=0.1)
    x = inputs()
    np.testing.assert_allclose(jit_call(layer, x), np_mamba2(layer, np.asarray(x, np.float64)),
                               rtol=2e-4, atol=2e-5)


def test_initialisations_follow_the_references():
    gdn = GatedDeltaNet(WIDTH, HEADS, rngs=nnx.Rngs(0))
    mamba = Mamba2(WIDTH, HEADS, rngs=nnx.Rngs(0))
    for layer, (low, high) in ((gdn, (0.0, 16.0)), (mamba, (1.0, 16.0))):
        a = np.exp(P(layer.A_log))
        assert np.all((a >= max(low, 1e-4)) & (a <= high))
        dt = softplus(P(layer.dt_bias))
        assert np.all((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7))
    np.testing.assert_array_equal(P(mamba.D), 1.0)
    assert mamba.bc_proj.kernel.shape == (WIDTH, 2 * 128) and mamba.num_heads == 8


def test_attention_mixers_match_numpy_composition():
    x = inputs()
    rope = rope_1d(WIDTH // HEADS, np.arange(LENGTH))
    rel = np.arange(LENGTH)[None, :] - np.arange(LENGTH)[:, None]
    cases = [
        (FullAttention(WIDTH, HEADS, rngs=nnx.Rngs(0)), np.ones_like(rel, bool)),
        (FullAttention(WIDTH, HEADS, causal=True, impl="chunked", chunk=8, rngs=nnx.Rngs(0)),
         rel <= 0),
        (SlidingWindowAttention(WIDTH, HEADS, window=7, rngs=nnx.Rngs(0)), (rel >= -3) & (rel <= 3)),
        (SlidingWindowAttention(WIDTH, HEADS, window=6, causal=True, rngs=nnx.Rngs(0)),
         (rel >= -5) & (rel <= 0)),
        (LocalAttention(WIDTH, HEADS, window=8, rngs=nnx.Rngs(0)),
         (np.arange(LENGTH)[:, None] // 8) == (np.arange(LENGTH)[None, :] // 8)),
    ]
    for i, (layer, mask) in enumerate(cases):
        perturb(layer, 10 + i)
        np.testing.assert_allclose(jit_call(layer, x, rope),
                                   np_attention_mixer(layer, np.asarray(x, np.float64), mask, rope),
                                   rtol=2e-4, atol=2e-5, err_msg=type(layer).__name__)


def small_config(direction="forward"):
    cfg = registry.default_mixer_config(WIDTH, HEADS)
    cfg.direction = direction
    cfg.ttt_mlp.mini_batch_size = 8
    cfg.ttt_linear.mini_batch_size = 8
    cfg.ttt_mlp.remat_group_size = cfg.ttt_linear.remat_group_size = 2
    cfg.gated_deltanet.chunk_size = 8
    cfg.mamba2.update(chunk_size=8, d_state=16)
    cfg.swa.window = 9
    return cfg


# ttt_mlp shares ttt_linear's code path; its own tests live in test_ttt_layers.py.
@pytest.mark.parametrize("name", [n for n in registry.mixer_names() if n != "ttt_mlp"])
def test_causal_direction_is_causal(name):
    mixer = registry.make_mixer(name, small_config("causal"), rngs=nnx.Rngs(0))
    x = inputs(1, batch=1)
    cut = 11
    x2 = x.at[:, cut:].set(jax.random.normal(jax.random.key(9), x[:, cut:].shape))
    y, y2 = jit_call(mixer, jnp.concatenate([x, x2]))          # one call, two examples
    np.testing.assert_allclose(y[:cut], y2[:cut], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y[cut:], y2[cut:], atol=1e-4)


def test_bidirectional_is_forward_plus_reversed():
    for name in registry.mixer_names():
        expect = registry.SumBidirectional if name in ("ttt_mlp", "ttt_linear", "gated_deltanet",
                                                       "mamba2") else type(None)
        built = registry.make_mixer(name, small_config("bidirectional"), rngs=nnx.Rngs(0))
        assert isinstance(built, expect) or (expect is type(None) and not built.causal), name
    # The wrapper itself, around a causal mixer that uses RoPE (tables must flip with x).
    inner = SlidingWindowAttention(WIDTH, HEADS, window=6, causal=True, rngs=nnx.Rngs(0))
    perturb(inner, 3)
    mixer = registry.SumBidirectional(inner)
    x = inputs(2)
    rope = rope_1d(WIDTH // HEADS, np.arange(LENGTH))
    rel = np.arange(LENGTH)[None, :] - np.arange(LENGTH)[:, None]
    x64 = np.asarray(x, np.float64)
    flipped = (np.flip(np.asarray(rope[0]), 0), np.flip(np.asarray(rope[1]), 0))
    want = (np_attention_mixer(inner, x64, (rel >= -5) & (rel <= 0), rope)
            + np.flip(np_attention_mixer(inner, np.flip(x64, 1), (rel >= -5) & (rel <= 0), flipped), 1))
    np.testing.assert_allclose(jit_call(mixer, x, rope), want, rtol=2e-4, atol=2e-5)


def test_registry_config_handling():
    assert registry.make_mixer("none", small_config(), rngs=nnx.Rngs(0)) is None
    assert "none" not in registry.mixer_names() and "none" in registry.MIXER_NAMES
    with pytest.raises(ValueError, match="unknown mixer"):
        registry.make_mixer("mamba7", small_config(), rngs=nnx.Rngs(0))
    flat = ml_collections.ConfigDict(dict(width=WIDTH, num_heads=HEADS, dtype=jnp.bfloat16,
                                          mini_batch_size=4))
    layer = registry.make_mixer("ttt_linear", flat, rngs=nnx.Rngs(0))
    assert layer.mini_batch_size == 4 and layer.dtype == jnp.bfloat16 and not layer.causal
    nested = small_config()
    nested.swa.window = 5
    nested.window = 3                                              # top-level key wins
    assert registry.make_mixer("swa", nested, rngs=nnx.Rngs(0)).window == 3
    with pytest.raises(ValueError, match=r"has no option\(s\) \['mini_batch_size'\]"):
        registry.make_mixer("swa", flat, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="direction"):
        registry.make_mixer("full", dict(width=WIDTH, num_heads=HEADS, direction="sideways"),
                            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width and num_heads"):
        registry.make_mixer("full", dict(width=WIDTH), rngs=nnx.Rngs(0))


# The TTT layers are checked the same way in test_ttt_layers.py.
@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2", "swa", "full"])
def test_jit_grad_and_sharded_mesh(name):
    mixer = registry.make_mixer(name, small_config(), rngs=nnx.Rngs(0))
    x = inputs(3, batch=2)
    rope = rope_1d(WIDTH // HEADS, np.arange(LENGTH))
    graphdef, state = nnx.split(mixer)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, rope=rope))
    ref = forward(state, x)
    assert ref.shape == x.shape and bool(jnp.all(jnp.isfinite(ref)))

    grads = jax.jit(jax.grad(lambda st, x: jnp.mean(nnx.merge(graphdef, st)(x, rope=rope) ** 2)))(state, x)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, (name, path)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    shardings = sharding.state_shardings(state, mesh)
    sharded = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, shardings,
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert any("tensor" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded)), name
    with jax.set_mesh(mesh):
        out = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, rope=rope))(sharded, x)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
