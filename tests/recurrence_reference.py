"""Per-token recurrences of the baseline mixers, the references of the chunked ops in
tttjax.ops.delta_rule and tttjax.ops.ssd: float64 NumPy loops for values, `lax.scan` forms
(differentiable; float64 under `jax.enable_x64`) for gradients, and the gradient check."""

import jax
import jax.numpy as jnp
import numpy as np


def delta_rule_reference(q, k, v, g, beta, scale=None, initial_state=None):
    """S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; o_t = scale S_t^T q_t.

    q, k [B, H, L, dk], v [B, H, L, dv], g, beta [B, H, L]; returns (o, S_L).
    """
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    b, h, length, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    s = (np.zeros((b, h, dk, v.shape[-1])) if initial_state is None
         else np.asarray(initial_state, np.float64).copy())
    eye = np.eye(dk)
    o = np.zeros(v.shape)
    for t in range(length):
        kt, bt = k[:, :, t], beta[:, :, t][..., None, None]
        house = eye - bt * kt[..., :, None] * kt[..., None, :]
        s = np.exp(g[:, :, t])[..., None, None] * (house @ s) + bt * kt[..., :, None] * v[:, :, t][..., None, :]
        o[:, :, t] = scale * np.einsum("bhkv,bhk->bhv", s, q[:, :, t])
    return o, s


def ssd_reference(x, dt, a, b_mat, c_mat, initial_state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t (head h reads group h // (H/G)).

    x [B, H, L, P], dt [B, H, L], a [H], B/C [B, G, L, N]; returns (y, h_L).
    """
    x, dt, a, b_mat, c_mat = (np.asarray(t, np.float64) for t in (x, dt, a, b_mat, c_mat))
    bsz, heads, length, p = x.shape
    groups, n = b_mat.shape[1], b_mat.shape[3]
    b_h = np.repeat(b_mat, heads // groups, axis=1)
    c_h = np.repeat(c_mat, heads // groups, axis=1)
    state = (np.zeros((bsz, heads, p, n)) if initial_state is None
             else np.asarray(initial_state, np.float64).copy())
    y = np.zeros(x.shape)
    for t in range(length):
        decay = np.exp(dt[:, :, t] * a[None, :])[..., None, None]
        state = decay * state + dt[:, :, t][..., None, None] * x[:, :, t][..., :, None] * b_h[:, :, t][..., None, :]
        y[:, :, t] = np.einsum("bhpn,bhn->bhp", state, c_h[:, :, t])
    return y, state


def _time_major(a):
    return jnp.moveaxis(a, 2, 0)


def delta_rule_scan(q, k, v, g, beta, s0):
    """`delta_rule_reference` as a `lax.scan` (default scale); returns (o, S_L)."""
    scale = q.shape[-1] ** -0.5

    def step(s, xs):
        qt, kt, vt, gt, bt = xs
        kts = jnp.einsum("bhk,bhkv->bhv", kt, s)
        s = jnp.exp(gt)[..., None, None] * (s - bt[..., None, None] * kt[..., :, None] * kts[..., None, :])
        s = s + bt[..., None, None] * kt[..., :, None] * vt[..., None, :]
        return s, scale * jnp.einsum("bhkv,bhk->bhv", s, qt)

    s, o = jax.lax.scan(step, s0, tuple(map(_time_major, (q, k, v, g, beta))))
    return jnp.moveaxis(o, 0, 2), s


def ssd_scan(x, dt, a, b_mat, c_mat, h0):
    """`ssd_reference` as a `lax.scan`; returns (y, h_L)."""
    heads, groups = x.shape[1], b_mat.shape[1]
    b_h = jnp.repeat(b_mat, heads // groups, axis=1)
    c_h = jnp.repeat(c_mat, heads // groups, axis=1)

    def step(h, xs):
        xt, dtt, bt, ct = xs
        h = jnp.exp(dtt * a)[..., None, None] * h + dtt[..., None, None] * xt[..., :, None] * bt[..., None, :]
        return h, jnp.einsum("bhpn,bhn->bhp", h, ct)

    h, y = jax.lax.scan(step, h0, tuple(map(_time_major, (x, dt, b_h, c_h))))
    return jnp.moveaxis(y, 0, 2), h


def assert_gradients_match(chunked, scan, inputs, names, seed=4):
    """Gradients of a random linear loss on (output, final state) w.r.t. every input: the
    chunked op in float32 (jitted) against `scan` in float64; both map `inputs` to
    (output, final state). Tolerance rtol 1e-4, atol 1e-4 * max |gradient|."""
    f32 = [jnp.asarray(t, jnp.float32) for t in inputs]
    out, state = jax.eval_shape(chunked, *f32)
    rng = np.random.default_rng(seed)
    w_out, w_state = rng.standard_normal(out.shape), rng.standard_normal(state.shape)

    def linear_loss(fn, w_o, w_s):
        def loss(*args):
            o, s = fn(*args)
            return jnp.sum(o * w_o) + jnp.sum(s * w_s)
        return loss

    argnums = tuple(range(len(inputs)))
    got = jax.jit(jax.grad(linear_loss(chunked, w_out.astype(np.float32), w_state.astype(np.float32)),
                           argnums=argnums))(*f32)
    with jax.enable_x64(True):
        want = jax.grad(linear_loss(scan, w_out, w_state), argnums=argnums)(
            *(jnp.asarray(t, jnp.float64) for t in inputs))
        want = [np.asarray(w) for w in want]
    for name, a, b in zip(names, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)
