"""Chunked gated delta rule against the per-token float64 recurrence (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrence_reference import assert_gradients_match, delta_rule_reference, delta_rule_scan
from tttjax.ops.delta_rule import gated_delta_rule, unit_lower_inverse

# jitted once per shape: much faster to compile than op-by-op eager dispatch
delta_rule = jax.jit(gated_delta_rule, static_argnames=("chunk_size", "scale", "return_state"))


def make_inputs(seed, b, h, length, dk, dv, decay=0.3):
    rng = np.random.default_rng(seed)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((b, h, length, dk)))
    k = unit(rng.standard_normal((b, h, length, dk)))
    v = rng.standard_normal((b, h, length, dv))
    g = -decay * np.abs(rng.standard_normal((b, h, length)))
    beta = 1 / (1 + np.exp(-rng.standard_normal((b, h, length))))
    s0 = rng.standard_normal((b, h, dk, dv))
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("shape,chunk", [
    ((1, 2, 64, 8, 8), 16),     # L a multiple of the chunk
    ((2, 2, 37, 8, 4), 16),     # padding, d_v != d_k
    ((1, 1, 5, 4, 4), 64),      # shorter than one chunk
    ((1, 3, 30, 16, 8), 12),    # chunk not a power of two, several chunks + padding
])
def test_matches_per_token_recurrence(shape, chunk):
    q, k, v, g, beta, s0 = make_inputs(0, *shape)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    o, s = delta_rule(f32(q), f32(k), f32(v), f32(g), f32(beta), chunk_size=chunk,
                      initial_state=f32(s0), return_state=True)
    o_ref, s_ref = delta_rule_reference(q, k, v, g, beta, initial_state=s0)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=2e-5)


def test_zero_initial_state_and_custom_scale():
    q, k, v, g, beta, _ = make_inputs(6, 2, 2, 37, 8, 4)
    o = delta_rule(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta)), chunk_size=16, scale=0.5)
    np.testing.assert_allclose(o, delta_rule_reference(q, k, v, g, beta, scale=0.5)[0],
                               rtol=1e-4, atol=2e-5)


def test_unit_lower_inverse():
    rng = np.random.default_rng(7)
    inverse = jax.jit(unit_lower_inverse)
    for c in (5, 48):   # padded to 8 / 64 inside
        t = np.eye(c) + np.tril(0.4 * rng.standard_normal((3, c, c)), -1)
        np.testing.assert_allclose(inverse(jnp.asarray(t, jnp.float32)), np.linalg.inv(t),
                                   rtol=1e-5, atol=1e-5 * np.abs(np.linalg.inv(t)).max())
    # identical keys, full writes, no decay: the worst case for the delta rule's system
    t = np.eye(64) + np.tril(np.ones((64, 64)), -1)
    np.testing.assert_allclose(inverse(jnp.asarray(t, jnp.float32)), np.linalg.inv(t), atol=1e-6)


def test_strong_decay_and_full_writes_stay_finite():
    # g down to -20 per token: in-chunk decay ratios span exp(-600); must not overflow.
    q, k, v, g, beta, _ = make_inputs(1, 1, 2, 40, 8, 8, decay=20.0)
    beta = np.ones_like(beta)
    o = delta_rule(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta)), chunk_size=32)
    np.testing.assert_allclose(o, delta_rule_reference(q, k, v, g, beta)[0], rtol=1e-4, atol=2e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v, g, beta, _ = make_inputs(2, 1, 2, 48, 8, 8)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    o = delta_rule(bf(q), bf(k), bf(v), jnp.asarray(g, jnp.float32), jnp.asarray(beta, jnp.float32),
                   chunk_size=16)
    assert o.dtype == jnp.bfloat16
    ref = delta_rule_reference(*(np.asarray(bf(a), np.float64) for a in (q, k, v)), g, beta)[0]
    np.testing.assert_allclose(np.asarray(o, np.float64), ref, rtol=2e-2, atol=2e-2)


def test_gradients_match_float64_recurrence():
    def chunked(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=s0, return_state=True)

    assert_gradients_match(chunked, delta_rule_scan, make_inputs(3, 2, 2, 37, 8, 6),
                           ("q", "k", "v", "g", "beta", "s0"))


# Packed sequences: row 0 has a one-token sequence, a start at a chunk boundary (16) and the
# chunk's last token (15); row 1 one start mid-chunk. Chunk 8, length 21 (padded to 24).
RESETS = ([1, 2, 15, 16], [10])


def _reset_mask(length):
    reset = np.zeros((2, length), bool)
    for row, starts in enumerate(RESETS):
        reset[row, starts] = True
    return reset


def _per_sequence(fn, length, *arrays, state):
    """`fn(*row arrays cut to one sequence, state) -> (out, final)` run sequence by sequence,
    each from `state`; (outputs concatenated, each row's last final state)."""
    outs, finals = [], []
    for row, starts in enumerate(RESETS):
        bounds = [0] + starts + [length]
        pieces = [fn(*(a[row:row + 1, :, s:e] for a in arrays), state[row:row + 1])
                  for s, e in zip(bounds[:-1], bounds[1:])]
        outs.append(jnp.concatenate([o for o, _ in pieces], axis=2))
        finals.append(pieces[-1][1])
    return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


def test_reset_restarts_every_packed_sequence_from_the_initial_state():
    q, k, v, g, beta, s0 = make_inputs(8, 2, 2, 21, 8, 4)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    o, s = delta_rule(f32(q), f32(k), f32(v), f32(g), f32(beta), chunk_size=8,
                      initial_state=f32(s0), return_state=True, reset=jnp.asarray(_reset_mask(21)))
    ref = lambda q, k, v, g, beta, s: delta_rule_reference(q, k, v, g, beta, initial_state=s)  # noqa: E731
    o_ref, s_ref = _per_sequence(ref, 21, q, k, v, g, beta, state=s0)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=2e-5)


def test_reset_gradients_match_float64_recurrence():
    reset = jnp.asarray(_reset_mask(21))

    def chunked(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, chunk_size=8, initial_state=s0,
                                return_state=True, reset=reset)

    def scan(q, k, v, g, beta, s0):
        return _per_sequence(delta_rule_scan, 21, q, k, v, g, beta, state=s0)

    # jitted: one compile instead of dispatching every step of seven scans (float64 inside)
    assert_gradients_match(chunked, jax.jit(scan), make_inputs(9, 2, 2, 21, 8, 4),
                           ("q", "k", "v", "g", "beta", "s0"))


def test_bad_shapes_raise():
    q, k, v, g, beta, s0 = (jnp.asarray(a, jnp.float32) for a in make_inputs(5, 1, 2, 8, 4, 4))
    with pytest.raises(ValueError, match="reset must be"):
        gated_delta_rule(q, k, v, g, beta, reset=jnp.zeros((1, 7), bool))
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[..., :4], beta)
    with pytest.raises(ValueError, match="v must be"):
        gated_delta_rule(q, k, v[:, :1], g, beta)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, initial_state=s0[..., :2])
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=0)
