"""Per-token float64 NumPy reference of the TTT inner loop, written from docs/design.md §1.

Deliberately different from the op: one token at a time, the LayerNorm gradient through its
explicit Jacobian matrix, the state materialised for every causal prefix. Shared by the op,
layer and kernel tests.
"""

import numpy as np

EPS = 1e-8


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_grad(x):
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)


def _ln(z, gamma, beta):
    """z [B,H,d]; gamma, beta [H,d]. Returns out, zhat, std."""
    mu = z.mean(-1, keepdims=True)
    std = np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + EPS)
    zhat = (z - mu) / std
    return gamma * zhat + beta, zhat, std


def _ln_jacobian(zhat, std, gamma):
    """d LN(z)_a / d z_c as a [B,H,d(a),d(c)] matrix."""
    d = zhat.shape[-1]
    eye = np.eye(d)
    jac_hat = (eye - 1.0 / d - zhat[..., :, None] * zhat[..., None, :] / d) / std[..., None]
    return gamma[..., :, None] * jac_hat


def _net(x, W, kind):
    """x [B,H,d]; W dict of [B,H,...]. Returns output and intermediates."""
    z1 = np.einsum("bhd,bhdf->bhf", x, W["W1"]) + W["b1"][..., 0, :]
    if kind == "linear":
        return z1, (z1, None)
    x2 = _gelu(z1)
    return np.einsum("bhf,bhfd->bhd", x2, W["W2"]) + W["b2"][..., 0, :], (z1, x2)


def _token_grad(W, k_t, y_t, gamma, beta, kind):
    """grad_W of 1/2 ||LN(g(k_t; W)) - y_t||^2 for one token, all (batch, head) pairs."""
    z, (z1, x2) = _net(k_t, W, kind)
    out, zhat, std = _ln(z, gamma, beta)
    jac = _ln_jacobian(zhat, std, gamma)
    dz = np.einsum("bhac,bha->bhc", jac, out - y_t)
    if kind == "linear":
        return {"W1": k_t[..., :, None] * dz[..., None, :], "b1": dz[..., None, :]}
    dz1 = np.einsum("bhd,bhfd->bhf", dz, W["W2"]) * _gelu_grad(z1)
    return {"W1": k_t[..., :, None] * dz1[..., None, :], "b1": dz1[..., None, :],
            "W2": x2[..., :, None] * dz[..., None, :], "b2": dz[..., None, :]}


def ttt_reference(kind, q, k, v, eta, params, mini_batch_size, *, causal=False,
                  token_idx_offset=None, initial_state=None):
    """Returns (z [B,H,L,d], final state dict [B,H,...]) in float64."""
    q, k, v, eta = (np.asarray(a, np.float64) for a in (q, k, v, eta))
    p = {key: np.asarray(val, np.float64) for key, val in params.items()}
    bsz, h, length, d = q.shape
    b = mini_batch_size
    gamma, beta = p["ln_weight"], p["ln_bias"]
    keys = ("W1", "b1") if kind == "linear" else ("W1", "b1", "W2", "b2")
    if initial_state is None:
        W = {key: np.broadcast_to(p[key], (bsz,) + p[key].shape).copy() for key in keys}
    else:
        W = {key: np.asarray(initial_state[key], np.float64).copy() for key in keys}

    r = v - k
    mu = r.mean(-1, keepdims=True)
    sd = r.std(-1, keepdims=True, ddof=1)
    y = gamma[None, :, None, :] * (r - mu) / (sd + EPS) + beta[None, :, None, :]

    scale = np.full(b, 1.0 / b)
    if causal:
        scale = 1.0 / np.arange(1, b + 1)
        if token_idx_offset is not None:
            scale = np.maximum(scale + np.asarray(token_idx_offset, np.float64), 0.0)

    z = np.zeros_like(q)
    for i in range(length // b):
        toks = range(i * b, (i + 1) * b)
        grads = [_token_grad(W, k[:, :, t], y[:, :, t], gamma, beta, kind) for t in toks]

        def state_after(n_tokens, s):
            return {key: W[key] - sum(s * eta[:, :, i * b + j, None, None] * grads[j][key]
                                      for j in range(n_tokens)) for key in keys}

        new_W = state_after(b, scale[-1])
        for j, t in enumerate(toks):
            Wt = state_after(j + 1, scale[j]) if causal else new_W
            zt, _ = _net(q[:, :, t], Wt, kind)
            z[:, :, t] = q[:, :, t] + _ln(zt, gamma, beta)[0]
        W = new_W
    return z, W
