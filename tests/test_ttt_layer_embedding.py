"""TTTMLP / TTTLinear as a user embeds them: state in and out, padding masks, Linen.

A sequence processed in two pieces (the first piece's final state passed to the second)
gives the outputs and state of one pass; masked tokens take no inner step (the same result
as the layer's own end padding); `flax.nnx.bridge.ToLinen` wraps the layer for Linen.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from tttjax.layers.ttt import TTTLinear, TTTMLP

TOL = dict(rtol=1e-5, atol=1e-5)


def _layer(cls, mini_batch_size=4):
    return cls(16, 2, mini_batch_size=mini_batch_size, base_lr=1.0, rngs=nnx.Rngs(0))


def _x(length, batch=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, length, 16), jnp.float32)


@pytest.mark.parametrize("cls", [TTTMLP, TTTLinear])
def test_two_pieces_with_the_state_passed_equal_one_pass(cls):
    layer, x = _layer(cls), _x(16)
    y, state = layer(x, return_state=True)
    y1, s1 = layer(x[:, :8], return_state=True)
    y2, s2 = layer(x[:, 8:], initial_state=s1, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, **TOL)
    assert state.keys() == s2.keys() and state["W1"].shape[:2] == (2, 2)
    for key in state:
        np.testing.assert_allclose(s2[key], state[key], err_msg=key, **TOL)


@pytest.mark.parametrize("cls", [TTTMLP, TTTLinear])
def test_masked_tokens_take_no_step(cls):
    layer, x = _layer(cls), _x(12)
    # tokens 10, 11 masked == a 10-token sequence (the layer pads it to 12 with no step)
    mask = jnp.arange(12) < 10
    y, state = layer(x, mask=mask, return_state=True)
    y_short, state_short = layer(x[:, :10], return_state=True)
    np.testing.assert_allclose(y[:, :10], y_short, **TOL)
    for key in state:
        np.testing.assert_allclose(state[key], state_short[key], err_msg=key, **TOL)
    # everything masked: the final state is the learned initial state
    _, untouched = layer(x, mask=jnp.zeros((2, 12), bool), return_state=True)
    for key in untouched:
        initial = jnp.broadcast_to(layer.inner_params()[key], untouched[key].shape)
        np.testing.assert_array_equal(untouched[key], initial)
    with pytest.raises(ValueError, match="mask must be"):
        layer(x, mask=jnp.ones((3,)))


def test_from_linen_through_tolinen():
    model = nnx.bridge.ToLinen(TTTMLP, args=(16, 2), kwargs=dict(mini_batch_size=4, base_lr=1.0))
    x = _x(8)
    variables = model.init(jax.random.key(0), x)
    y = model.apply(variables, x)
    assert y.shape == x.shape and jnp.isfinite(y).all()

    class Block(linen.Module):      # a user's Linen model with the layer inside
        @linen.compact
        def __call__(self, h):
            mixer = nnx.bridge.ToLinen(TTTMLP, args=(16, 2),
                                       kwargs=dict(mini_batch_size=4, base_lr=1.0))
            return h + mixer(linen.LayerNorm()(h))

    block = Block()
    params = block.init(jax.random.key(1), x)["params"]
    grads = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x) ** 2))(params)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(jnp.isfinite(g).all() for g in leaves)
