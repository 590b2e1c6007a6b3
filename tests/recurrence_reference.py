"""Per-token float64 recurrences of the baseline mixers (NumPy), the references of the
chunked ops in tttjax.ops.delta_rule and tttjax.ops.ssd."""

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
