"""Chunked SSD (Mamba 2) against the per-token float64 recurrence (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrence_reference import ssd_reference
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


def _scan_reference(x, dt, a, b_mat, c_mat, h0):
    heads, groups = x.shape[1], b_mat.shape[1]
    b_h = jnp.repeat(b_mat, heads // groups, axis=1)
    c_h = jnp.repeat(c_mat, heads // groups, axis=1)

    def step(h, xs):
        xt, dtt, bt, ct = xs
        h = jnp.exp(dtt * a)[..., None, None] * h + dtt[..., None, None] * xt[..., :, None] * bt[..., None, :]
        return h, jnp.einsum("bhpn,bhn->bhp", h, ct)

    t = lambda v: jnp.moveaxis(v, 2, 0)  # noqa: E731
    h, y = jax.lax.scan(step, h0, (t(x), t(dt), t(b_h), t(c_h)))
    return jnp.moveaxis(y, 0, 2), h


def test_gradients_match_float64_recurrence():
    inputs = make_inputs(3, 2, 4, 37, 3, 2, 5)
    rng = np.random.default_rng(4)
    w_y, w_h = rng.standard_normal(inputs[0].shape), rng.standard_normal(inputs[5].shape)

    def loss_chunked(*args):
        y, h = ssd(*args[:5], chunk_size=16, initial_state=args[5], return_state=True)
        return jnp.sum(y * w_y.astype(np.float32)) + jnp.sum(h * w_h.astype(np.float32))

    def loss_ref(*args):
        y, h = _scan_reference(*args)
        return jnp.sum(y * w_y) + jnp.sum(h * w_h)

    got = jax.jit(jax.grad(loss_chunked, argnums=tuple(range(6))))(
        *(jnp.asarray(t, jnp.float32) for t in inputs))
    with jax.enable_x64(True):
        want = jax.grad(loss_ref, argnums=tuple(range(6)))(*(jnp.asarray(t, jnp.float64) for t in inputs))
        want = [np.asarray(w) for w in want]
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)


def test_bad_shapes_raise():
    x, dt, a, b_mat, c_mat, h0 = (jnp.asarray(t, jnp.float32) for t in make_inputs(5, 1, 4, 8, 2, 2, 3))
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[..., :3], a, b_mat, c_mat)
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, a[:2], b_mat, c_mat)
    with pytest.raises(ValueError, match="groups 3 must divide"):
        ssd(x, dt, a, jnp.concatenate([b_mat, b_mat[:, :1]], 1), jnp.concatenate([c_mat, c_mat[:, :1]], 1))
    with pytest.raises(ValueError, match="initial_state"):
        ssd(x, dt, a, b_mat, c_mat, initial_state=h0[..., :1])
