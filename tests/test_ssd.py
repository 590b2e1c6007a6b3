"""Chunked SSD (Mamba 2) against the per-token float64 recurrence (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrence_reference import assert_gradients_match, ssd_reference, ssd_scan
from tttjax.ops.ssd import ssd

ssd_jit = jax.jit(ssd, static_argnames=("chunk_size", "return_state"))


def make_inputs(seed, b, h, length, p, g, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, length, p))
    dt = np.log1p(np.exp(rng.standard_normal((b, h, length)) - 1.0))   # softplus, positive
    a = -np.exp(rng.uniform(np.log(1.0), np.log(16.0), h)) / 4
    b_mat = rng.standard_normal((b, g, length, n))
    c_mat = rng.standard_normal((b, g, length, n))
    h0 = rng.standard_normal((b, h, p, n))
    return x, dt, a, b_mat, c_mat, h0


@pytest.mark.parametrize("shape,chunk", [
    ((1, 2, 64, 4, 1, 8), 16),    # L a multiple of the chunk, one group
    ((2, 4, 37, 5, 2, 6), 16),    # padding, two groups of two heads
    ((1, 2, 7, 3, 2, 4), 64),     # shorter than one chunk, a group per head
])
def test_matches_per_token_recurrence(shape, chunk):
    x, dt, a, b_mat, c_mat, h0 = make_inputs(0, *shape)
    f32 = lambda t: jnp.asarray(t, jnp.float32)  # noqa: E731
    y, h = ssd_jit(f32(x), f32(dt), f32(a), f32(b_mat), f32(c_mat), chunk_size=chunk,
                   initial_state=f32(h0), return_state=True)
    y_ref, h_ref = ssd_reference(x, dt, a, b_mat, c_mat, initial_state=h0)
    scale = np.abs(y_ref).max()
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-5 * np.abs(h_ref).max())
    y0 = ssd_jit(f32(x), f32(dt), f32(a), f32(b_mat), f32(c_mat), chunk_size=chunk)
    np.testing.assert_allclose(y0, ssd_reference(x, dt, a, b_mat, c_mat)[0], rtol=1e-4,
                               atol=1e-5 * scale)


def test_strong_decay_stays_finite():
    x, dt, a, b_mat, c_mat, _ = make_inputs(1, 1, 2, 50, 4, 1, 8)
    dt = dt * 50.0                       # exp(dt A) down to ~e^-400 inside a chunk
    f32 = lambda t: jnp.asarray(t, jnp.float32)  # noqa: E731
    y = ssd_jit(f32(x), f32(dt), f32(a), f32(b_mat), f32(c_mat), chunk_size=32)
    y_ref = ssd_reference(x, dt, a, b_mat, c_mat)[0]
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * np.abs(y_ref).max())


def test_gradients_match_float64_recurrence():
    def chunked(x, dt, a, b_mat, c_mat, h0):
        return ssd(x, dt, a, b_mat, c_mat, chunk_size=16, initial_state=h0, return_state=True)

    assert_gradients_match(chunked, ssd_scan, make_inputs(3, 2, 4, 37, 3, 2, 5),
                           ("x", "dt", "A", "B", "C", "h0"))


# Packed sequences: row 0 has a one-token sequence, a start at a chunk boundary (16) and the
# chunk's last token (15); row 1 one start mid-chunk. Chunk 8, length 21 (padded to 24).
RESETS = ([1, 2, 15, 16], [10])


def _per_sequence(fn, length, x, dt, a, b_mat, c_mat, h0):
    """`fn` run sequence by sequence, each from h0; (outputs concatenated, last final states)."""
    outs, finals = [], []
    for row, starts in enumerate(RESETS):
        bounds = [0] + starts + [length]
        pieces = [fn(*(t[row:row + 1, :, s:e] for t in (x, dt)), a,
                     *(t[row:row + 1, :, s:e] for t in (b_mat, c_mat)), h0[row:row + 1])
                  for s, e in zip(bounds[:-1], bounds[1:])]
        outs.append(jnp.concatenate([y for y, _ in pieces], axis=2))
        finals.append(pieces[-1][1])
    return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


def _reset_mask(length):
    reset = np.zeros((2, length), bool)
    for row, starts in enumerate(RESETS):
        reset[row, starts] = True
    return jnp.asarray(reset)


def test_reset_restarts_every_packed_sequence_from_the_initial_state():
    x, dt, a, b_mat, c_mat, h0 = make_inputs(8, 2, 4, 21, 3, 2, 5)
    f32 = lambda t: jnp.asarray(t, jnp.float32)  # noqa: E731
    y, h = ssd_jit(f32(x), f32(dt), f32(a), f32(b_mat), f32(c_mat), chunk_size=8,
                   initial_state=f32(h0), return_state=True, reset=_reset_mask(21))
    ref = lambda x, dt, a, b, c, h: ssd_reference(x, dt, a, b, c, initial_state=h)  # noqa: E731
    y_ref, h_ref = _per_sequence(ref, 21, x, dt, a, b_mat, c_mat, h0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * np.abs(y_ref).max())
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-5 * np.abs(h_ref).max())


def test_reset_gradients_match_float64_recurrence():
    reset = _reset_mask(21)

    def chunked(x, dt, a, b_mat, c_mat, h0):
        return ssd(x, dt, a, b_mat, c_mat, chunk_size=8, initial_state=h0, return_state=True,
                   reset=reset)

    def scan(*args):
        return _per_sequence(ssd_scan, 21, *args)

    # jitted: one compile instead of dispatching every step of seven scans (float64 inside)
    assert_gradients_match(chunked, jax.jit(scan), make_inputs(9, 2, 4, 21, 3, 2, 5),
                           ("x", "dt", "A", "B", "C", "h0"))


def test_bad_shapes_raise():
    x, dt, a, b_mat, c_mat, h0 = (jnp.asarray(t, jnp.float32) for t in make_inputs(5, 1, 4, 8, 2, 2, 3))
    with pytest.raises(ValueError, match="reset must be"):
        ssd(x, dt, a, b_mat, c_mat, reset=jnp.zeros((1, 7), bool))
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[..., :3], a, b_mat, c_mat)
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, a[:2], b_mat, c_mat)
    with pytest.raises(ValueError, match="groups 3 must divide"):
        ssd(x, dt, a, jnp.concatenate([b_mat, b_mat[:, :1]], 1), jnp.concatenate([c_mat, c_mat[:, :1]], 1))
    with pytest.raises(ValueError, match="initial_state"):
        ssd(x, dt, a, b_mat, c_mat, initial_state=h0[..., :1])
