"""Packed sequences (`segment_ids`) in the TTT op and layers: a packed batch equals running
each sequence on its own from a fresh state, outputs and every gradient.

Tolerance: float32, packed vs separate within 2e-5 x the array's largest magnitude (the two
runs group the mini-batches differently, so float32 round-off differs; a state leaking across
a boundary, or a reset gradient lost, is off by O(1) of the signal).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_ttt_ops import f32, make_inputs
from tttjax.layers.ttt import TTTLinear, TTTMLP
from tttjax.ops import ttt

OPS = {"mlp": ttt.ttt_mlp, "linear": ttt.ttt_linear}
LAYERS = {"mlp": TTTMLP, "linear": TTTLinear}
B = 8  # mini-batch


def close(got, want, what, rel=2e-5):
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, r = np.asarray(a), np.asarray(r)
        assert np.abs(r).max() > 1e-6, f"{what}: vacuously small"
        np.testing.assert_allclose(a, r, rtol=0, atol=rel * np.abs(r).max(), err_msg=what)


@pytest.mark.parametrize("causal", [False, True], ids=["video", "causal"])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_packed_op_equals_separate_sequences(kind, causal):
    """Row 0 packs [2 mini-batches | 3 mini-batches], row 1 is one 5-mini-batch sequence; remat
    groups of 2 (a reset inside a group, one at a group start, a remainder group). Gradients
    w.r.t. q, k, v, eta, params and the initial state, which a reset feeds again."""
    op = OPS[kind]
    q, k, v, eta, params = f32(make_inputs(11, kind, 2, 2, 5 * B, 16))
    rng = np.random.default_rng(0)
    state0 = {key: jnp.asarray(np.asarray(params[key])[None] + 0.1 * rng.standard_normal(
        (2,) + params[key].shape), jnp.float32) for key in ttt.STATE_KEYS[kind]}
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ids = jnp.asarray(np.r_[[0] * 2 * B + [1] * 3 * B, [7] * 5 * B].reshape(2, 5 * B), jnp.int32)
    kw = dict(mini_batch_size=B, remat_group_size=2, causal=causal)

    def packed(args):
        q, k, v, eta, p, s0 = args
        z = op(q, k, v, eta, p, initial_state=s0, segment_ids=ids, **kw)
        return jnp.sum(z * w), z

    def separate(args):
        q, k, v, eta, p, s0 = args
        total, zs = 0.0, []
        for row, (lo, hi) in ((0, (0, 2 * B)), (0, (2 * B, 5 * B)), (1, (0, 5 * B))):
            part = lambda x: x[row:row + 1, :, lo:hi]  # noqa: E731
            z = op(part(q), part(k), part(v), eta[row:row + 1, :, lo:hi], p,
                   initial_state={key: s[row:row + 1] for key, s in s0.items()}, **kw)
            total += jnp.sum(z * part(w))
            zs.append(z)
        return total, jnp.concatenate([jnp.concatenate(zs[:2], axis=2), zs[2]], axis=0)

    args = (q, k, v, eta, params, state0)
    (_, z), grads = jax.jit(jax.value_and_grad(packed, has_aux=True))(args)
    (_, z_ref), grads_ref = jax.jit(jax.value_and_grad(separate, has_aux=True))(args)
    close(z, z_ref, "z")
    ln = ("ln_weight", "ln_bias")  # params' state is replaced by initial_state: no gradient
    grads, grads_ref = ((*g[:4], {key: g[4][key] for key in ln}, g[5]) for g in (grads, grads_ref))
    for name, g, r in zip(("q", "k", "v", "eta", "params", "initial_state"), grads, grads_ref):
        close(g, r, f"d{name}")
    # Without the resets the packed row differs: the comparison can fail.
    z_plain = op(q, k, v, eta, params, initial_state=state0, **kw)
    assert np.abs(np.asarray(z_plain - z_ref))[0, :, 2 * B:].max() > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["video", "causal"])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_packed_layer_equals_separate_sequences(kind, causal):
    """[12 real + 4 padding (mask 0, any id) | 16 real] through the layer equals the two
    sequences alone (the layer pads the 12 itself): outputs on real tokens, gradients w.r.t.
    the input's real tokens and every parameter."""
    layer = LAYERS[kind](32, 2, mini_batch_size=B, causal=causal, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 32, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 32, 32)), jnp.float32)
    mask = jnp.asarray(np.r_[[1] * 12, [0] * 4, [1] * 16][None], jnp.int32)
    ids = jnp.asarray(np.r_[[3] * 12, [99] * 4, [4] * 16][None], jnp.int32)
    real = np.asarray(mask[0]) == 1

    def packed(state, x):
        y = nnx.merge(graphdef, state)(x, mask=mask, segment_ids=ids)
        return jnp.sum(y * w * mask[..., None]), y

    def separate(state, x):
        model = nnx.merge(graphdef, state)
        y1, y2 = model(x[:, :12]), model(x[:, 16:])
        return jnp.sum(y1 * w[:, :12]) + jnp.sum(y2 * w[:, 16:]), jnp.concatenate([y1, y2], 1)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    (_, y), (dstate, dx) = grad(packed)(state, x)
    (_, y_ref), (dstate_ref, dx_ref) = grad(separate)(state, x)
    close(y[:, real], y_ref, "y")
    close(dx[:, real], dx_ref[:, real], "dx")
    # Parameter gradients sum over every token and head in float32 (the ops compute in it),
    # in a different order once packed: the causal token_idx_offset gradient differs by 3.4e-5
    # of its largest entry (the same with the padding zeroed or scaled 100x: rounding, not a
    # leak). A missed reset or a leaking pad moves them by far more than 1e-4.
    for (path, g), (_, r) in zip(nnx.to_flat_state(dstate), nnx.to_flat_state(dstate_ref)):
        close(g[...], r[...], f"d{path}", rel=1e-4)


def test_misaligned_start_raises_and_pallas_refuses():
    q, k, v, eta, params = f32(make_inputs(3, "mlp", 1, 1, 4 * B, 16))
    ids = jnp.asarray([[0] * 12 + [1] * 20])
    with pytest.raises(ValueError, match="new sequence at token 12 of row 0, not a multiple of "
                       "mini_batch_size=8.*pad each packed sequence to a multiple of 8"):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=B, segment_ids=ids)
    layer = TTTLinear(32, 2, mini_batch_size=B, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="new sequence at token 12"):
        layer(jnp.ones((1, 32, 32)), segment_ids=ids)
    good = jnp.asarray([[0] * 16 + [1] * 16])
    with pytest.raises(ValueError, match="segment_ids \\(state resets\\) runs in the XLA op"):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=B, segment_ids=good,
                    impl="pallas_interpret")
    z_auto = ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=B, segment_ids=good, impl="auto")
    z_xla = ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=B, segment_ids=good)
    np.testing.assert_array_equal(np.asarray(z_auto), np.asarray(z_xla))
    # Under jit the ids are traced and cannot raise: the row becomes NaN, never silently wrong.
    z = jax.jit(lambda s: ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=B, segment_ids=s))(ids)
    assert np.isnan(np.asarray(z)).all()
