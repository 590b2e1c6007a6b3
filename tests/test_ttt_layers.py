"""TTTMLP / TTTLinear NNX layers and the gated bidirectional helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttjax import sharding
from tttjax.layers.bidirectional import GatedBidirectional, gated_bidirectional
from tttjax.layers.ttt import TTTLinear, TTTMLP
from tttjax.ops.rope import apply_rope, rope_3d
from ttt_reference import ttt_reference

LAYERS = {"mlp": TTTMLP, "linear": TTTLinear}


def np_layer_forward(layer, x, rope=None):
    """float64 NumPy composition of docs/design.md §1 from the layer's parameters."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    bsz, length, width = x.shape
    h, d, b = layer.num_heads, layer.head_dim, layer.mini_batch_size

    def proj(lin):
        y = x @ p(lin.kernel) + p(lin.bias)
        return y.reshape(bsz, length, h, d).transpose(0, 2, 1, 3)

    def l2(a):
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    def rot(a, cos, sin):
        pairs = a.reshape(*a.shape[:-1], -1, 2)
        rotated = np.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(a.shape)
        return a * cos + rotated * sin

    q, k, v = l2(proj(layer.wq)), l2(proj(layer.wk)), proj(layer.wv)
    if rope is not None:
        cos, sin = (np.asarray(t, np.float64) for t in rope)
        q, k = rot(q, cos, sin), rot(k, cos, sin)
    gate = np.einsum("bld,hd->bhl", x, p(layer.theta_lr)) + p(layer.b_lr)[:, None]
    eta = layer.base_lr / (1 + np.exp(-gate)) / d
    params = {key: np.asarray(val, np.float64) for key, val in layer.inner_params().items()}
    z, _ = ttt_reference(layer.kind, q, k, v, eta, params, b)
    z = z.transpose(0, 2, 1, 3).reshape(bsz, length, width)
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    zn = (z - mu) / np.sqrt(var + 1e-6) * p(layer.post_norm.scale) + p(layer.post_norm.bias)
    return zn @ p(layer.wo.kernel) + p(layer.wo.bias)


def perturb(layer, seed, scale=0.3):
    """Moves parameters off their init so the comparison exercises every one of them."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            var[...] = var[...] + scale * jnp.asarray(rng.standard_normal(var.shape), var.dtype)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_layer_matches_numpy_composition(kind):
    layer = LAYERS[kind](32, 4, mini_batch_size=8, rngs=nnx.Rngs(0))
    perturb(layer, 1)
    x = np.random.default_rng(2).standard_normal((2, 24, 32))
    rope = rope_3d((2, 3, 4), 8, split=(2, 2, 4))
    out = nnx.jit(lambda m, x, r: m(x, rope=r))(layer, jnp.asarray(x, jnp.float32), rope)
    ref = np_layer_forward(layer, x, rope)
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5 * np.abs(ref).max(), rtol=0)


def test_init_follows_spec_and_is_annotated():
    layer = TTTMLP(64, 4, rngs=nnx.Rngs(0))
    d = 16
    assert layer.W1.shape == (4, d, 4 * d) and layer.W2.shape == (4, 4 * d, d)
    assert layer.b1.shape == (4, 1, 4 * d) and layer.b2.shape == (4, 1, d)
    assert layer.theta_lr.shape == (4, 64) and layer.b_lr.shape == (4,)
    np.testing.assert_array_equal(layer.ln_weight[...], 1.0)
    np.testing.assert_array_equal(layer.ln_bias[...], 0.0)
    np.testing.assert_array_equal(layer.b_lr[...], 0.0)
    np.testing.assert_array_equal(layer.wq.bias[...], 0.0)
    assert abs(float(jnp.std(layer.W1[...])) - 0.02) < 0.002
    assert abs(float(jnp.std(layer.wq.kernel[...])) - 0.02) < 0.002
    assert layer.post_norm.epsilon == 1e-6
    with nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        specs = nnx.get_partition_spec(nnx.state(layer))
    assert tuple(specs["W1"].get_value()) == ("tensor", None, None)
    assert tuple(specs["wq"]["kernel"].get_value()) == ("fsdp", "tensor")
    assert tuple(specs["wo"]["kernel"].get_value()) == ("tensor", "fsdp")
    lin = TTTLinear(64, 4, rngs=nnx.Rngs(0))
    assert lin.W1.shape == (4, d, d) and not hasattr(lin, "W2")
    assert lin.mini_batch_size == 16 and lin.base_lr == 1.0


def test_padding_keeps_complete_minibatches_and_grads_reach_every_param():
    layer = TTTMLP(32, 2, mini_batch_size=8, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (1, 21, 32))
    full = layer(x)
    assert full.shape == (1, 21, 32)
    # Tokens of complete mini-batches do not see the padded tail.
    np.testing.assert_allclose(np.asarray(full[:, :16]), np.asarray(layer(x[:, :16])), atol=1e-6, rtol=0)

    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
    for path, g in nnx.to_flat_state(grads):
        assert float(jnp.abs(g[...]).max()) > 0, f"no gradient reaches {path}"


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_compute_float32_params(kind):
    """bf16 compute against the float64 composition on the same (bf16-rounded) input.

    Tolerance: 2 bf16 epsilons (2^-7 each) of the output's largest magnitude; measured errors
    are 0.6-0.9 of one. The check must be able to fail: a doubled inner step (base_lr), a
    plausible bug, moves the float64 reference by several tolerances.
    """
    layer = LAYERS[kind](32, 2, mini_batch_size=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    perturb(layer, 0)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32)).astype(jnp.bfloat16)
    out = layer(x)
    assert out.dtype == jnp.bfloat16 and layer.W1[...].dtype == jnp.float32
    out = np.asarray(out, np.float64)
    x64 = np.asarray(x, np.float64)
    ref = np_layer_forward(layer, x64)
    tol = 2 * float(jnp.finfo(jnp.bfloat16).eps) * np.abs(ref).max()
    assert np.abs(out - ref).max() <= tol, (np.abs(out - ref).max(), tol)
    layer.base_lr *= 2.0
    wrong = np_layer_forward(layer, x64)
    assert np.abs(out - wrong).max() > 2 * tol, (np.abs(out - wrong).max(), tol)


def test_layer_sharded_over_heads_equals_one_device():
    layer = TTTMLP(64, 8, mini_batch_size=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 16, 64))
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = fn(state, x)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    shardings = sharding.state_shardings(state, mesh)
    sharded_state = jax.device_put(state, shardings)
    assert sharded_state["W1"][...].sharding.spec[0] == "tensor"
    with jax.set_mesh(mesh):
        x_sh = jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        sh_loss, sh_grads = fn(sharded_state, x_sh)
    np.testing.assert_allclose(float(sh_loss), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sh_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * float(np.abs(b).max()) + 1e-7, rtol=1e-4)


def test_gated_bidirectional_matches_formula_and_keeps_positions():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    cos = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    sin = jnp.zeros((6, 4))
    # A causal, position-dependent mixer: cumulative sum scaled by each token's cos.
    fn = lambda a, rope: jnp.cumsum(a, axis=1) * rope[0]  # noqa: E731
    gf, gb = jnp.full((4,), 0.3), jnp.full((4,), -0.7)
    out = gated_bidirectional(fn, x, gf, gb, rope=(cos, sin))
    xn, c = np.asarray(x), np.asarray(cos)
    z = xn + np.tanh(0.3) * np.cumsum(xn, 1) * c
    ref = z + np.tanh(-0.7) * np.flip(np.cumsum(np.flip(z, 1), 1), 1) * c
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # An explicit permutation that equals the flip gives the same result.
    out_idx = gated_bidirectional(fn, x, gf, gb, rope=(cos, sin), reverse_index=jnp.arange(5, -1, -1))
    np.testing.assert_allclose(np.asarray(out_idx), np.asarray(out), atol=1e-6)
    # A general permutation, as a traced array and as a host (NumPy) array whose inverse is
    # computed on the host: both equal the formula with the permutation applied explicitly.
    perm = rng.permutation(6).astype(np.int32)
    undo = np.argsort(perm)
    ref = z + np.tanh(-0.7) * (np.cumsum(z[:, perm], 1) * c[perm])[:, undo]
    for index in (jnp.asarray(perm), perm):
        out_perm = jax.jit(lambda x, i=index: gated_bidirectional(fn, x, gf, gb, rope=(cos, sin),
                                                                 reverse_index=i))(x)
        np.testing.assert_allclose(np.asarray(out_perm), ref, atol=1e-5)


def test_gated_bidirectional_module_with_ttt_and_modalities():
    layer = TTTLinear(32, 2, mini_batch_size=4, rngs=nnx.Rngs(0))
    bi = GatedBidirectional(layer, 32)
    np.testing.assert_allclose(np.tanh(np.asarray(bi.alpha_fwd[...])), np.tanh(0.1))
    x = jax.random.normal(jax.random.key(3), (1, 8, 32))
    modality = jnp.array([0, 0, 1, 1, 1, 1, 1, 1])
    out = bi(x, modality=modality)
    bi.alpha_fwd[...] = bi.alpha_fwd[...].at[1].set(0.0)
    bi.alpha_bwd[...] = bi.alpha_bwd[...].at[1].set(0.0)
    out_text_only = bi(x, modality=modality)
    assert out.shape == x.shape
    # With the video gates closed, the video tokens pass through unchanged.
    np.testing.assert_allclose(np.asarray(out_text_only[:, 2:]), np.asarray(x[:, 2:]), atol=1e-6)
    assert float(jnp.abs(out_text_only[:, :2] - x[:, :2]).max()) > 1e-4


def test_rope_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed

    cos_t, sin_t = get_3d_rotary_pos_embed(64, ((0, 0), (3, 5)), (3, 5), 4)
    cos, sin = rope_3d((4, 3, 5), 64)
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=1e-5)
    x = np.random.default_rng(0).standard_normal((1, 2, 60, 64)).astype(np.float32)
    ref = apply_rotary_emb(torch.from_numpy(x), (cos_t, sin_t)).numpy()
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), ref, atol=1e-5)
