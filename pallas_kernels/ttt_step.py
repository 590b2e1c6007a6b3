"""One non-causal TTT mini-batch for one (batch, head) pair: forward and hand-derived backward.

This module is the one home of the TTT layer's per-mini-batch math and constants (the
LayerNorm forward and backward, GELU and its derivatives, the epsilon, the target, the state
names): the XLA op (`tttjax.ops.ttt`) builds its scans from these functions, and the TPU
(Mosaic) and GPU (Triton) kernels are loops and memory plumbing around `forward_step` /
`backward_step`. It imports nothing from tttjax, so the dependencies go one way:
`tttjax.ops.ttt` (validation, dispatch) -> `pallas_kernels.ttt` (kernel wrapper) ->
`ttt_tpu` / `ttt_gpu` -> this module. The step functions are 2-D float32 (`b` tokens x features; the XLA op vmaps them over batch
and heads); the elementwise and row-wise helpers accept any leading dims. All are written with
the operations both Pallas lowerings accept: 2-D matmuls (`lax.dot_general`, HIGHEST precision so
Triton does not drop to TF32), elementwise math, and keep-dims reductions along one axis.

Forward of one step (docs/design.md §1, non-causal), with `w = eta / b` per token (column [b, 1]):

    Z1 = K W1 + b1;  X2 = gelu(Z1);  Z2 = X2 W2 + b2             (TTT-Linear: Z2 = Z1)
    G  = LN(Z2) - Y;  dZ2 = LN'(Z2)^T G;  dZ1 = (dZ2 W2^T) * gelu'(Z1)
    W1' = W1 - K^T (w dZ1),  b1' = b1 - sum(w dZ1),  W2' = W2 - X2^T (w dZ2),  b2' = ...
    z  = Q + LN(gelu(Q W1' + b1') W2' + b2')

The backward is the exact VJP of that map (including the second-order terms of the inner
gradient: the VJP of the LayerNorm backward and gelu''), derived by hand; `tests/
test_pallas_ttt.py` checks it against `jax.vjp` of the XLA op's `_minibatch_step` (the
einsum form, which also covers the causal case).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax.numpy as jnp
from jax import lax

LN_EPS = 1e-8  # docs/design.md §1: inner LayerNorm epsilon
_HI = lax.Precision.HIGHEST
_C = math.sqrt(2.0 / math.pi)
_A = 0.044715

STATE_NAMES = {"mlp": ("W1", "b1", "W2", "b2"), "linear": ("W1", "b1")}


def hidden_width(kind: str, d: int) -> int:
    """F, the width of W1's output: 4d for TTT-MLP, d for TTT-Linear."""
    return 4 * d if kind == "mlp" else d


# --------------------------------------------------------------------------- 2-D building blocks


def _mm(a, b):
    """a [m, k] @ b [k, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HI)


def _mm_tn(a, b):
    """a^T b for a [k, m], b [k, n] (contract the token axis)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HI)


def _mm_nt(a, b):
    """a b^T for a [m, k], b [n, k]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI)


# None: no caller has chosen (the XLA op then picks per platform); True / False: chosen.
_ROW_SUMS_AS_MATMULS = contextvars.ContextVar("ttt_step_row_sums_as_matmuls", default=None)


@contextlib.contextmanager
def row_sums_as_matmuls(enabled: bool = True):
    """While tracing inside this context, the row (feature-axis) sums of the functions below
    are matmuls with a ones column (`enabled`) or reductions (`enabled=False`). Same numbers
    (float32 accumulation, HIGHEST precision). Without a context the XLA op traces its steps
    with matmuls on CPU, because XLA:CPU runs each small reduction as a separate library call
    that costs more than the matmul (measured: README, "Measured: ops benchmark"); an explicit
    context wins over that choice (e.g. `enabled=False` to count the model's own FLOPs). The
    Pallas kernels never enter it: their lowerings want keep-dims reductions, not [., 1]-wide
    matmuls."""
    token = _ROW_SUMS_AS_MATMULS.set(bool(enabled))
    try:
        yield
    finally:
        _ROW_SUMS_AS_MATMULS.reset(token)


def row_sums_choice() -> bool | None:
    """The enclosing `row_sums_as_matmuls` context's choice, or None outside any."""
    return _ROW_SUMS_AS_MATMULS.get()


def _row_sum(x, scale=1.0):
    """scale * sum of x [..., n] over its last axis, keeping it ([..., 1])."""
    if _ROW_SUMS_AS_MATMULS.get():
        ones = jnp.full((x.shape[-1], 1), scale, x.dtype)
        return lax.dot_general(x, ones, (((x.ndim - 1,), (0,)), ((), ())), precision=_HI)
    total = jnp.sum(x, axis=-1, keepdims=True)
    return total if scale == 1.0 else total * scale


def _row_mean(x):
    return _row_sum(x, 1.0 / x.shape[-1])


def _col_sum(x):
    return jnp.sum(x, axis=0, keepdims=True)


def gelu_parts(x):
    """gelu_tanh(x) (the tanh approximation), its first and second derivatives."""
    u = _C * (x + _A * x * x * x)
    du = _C * (1.0 + 3.0 * _A * x * x)
    t = jnp.tanh(u)
    sech2 = 1.0 - t * t
    g = 0.5 * x * (1.0 + t)
    g1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    g2 = sech2 * (du - x * t * du * du + 3.0 * _A * _C * x * x)
    return g, g1, g2


def gelu(x):
    """The tanh-approximated GELU (docs/design.md §1)."""
    return 0.5 * x * (1.0 + jnp.tanh(_C * (x + _A * x * x * x)))


def gelu_grad(x):
    """d/dx of `gelu`."""
    return gelu_parts(x)[1]


def ln_stats(z):
    """Normalised rows and their std (biased variance + eps) along the last axis, z [..., d]."""
    zc = z - _row_mean(z)
    std = jnp.sqrt(_row_mean(zc * zc) + LN_EPS)
    return zc / std, std


def ln_input_grad(g, zhat, std):
    """Gradient w.r.t. LN's input, given g = (cotangent of LN's output) * gamma (the closed
    form of docs/design.md §1's `LN_backward`)."""
    return (g - _row_mean(g) - zhat * _row_mean(g * zhat)) / std


# --------------------------------------------------------------------------- target


def _target_parts(k, v):
    """Centred v - k, its unbiased std (floored as the XLA op's) and 1 / (std + eps)."""
    r = v - k
    c = r - _row_mean(r)
    var = jnp.sum(c * c, axis=-1, keepdims=True) * (1.0 / (r.shape[-1] - 1))
    var_floor = jnp.maximum(var, 1e-30)
    std = jnp.sqrt(var_floor)
    return c, var, std, 1.0 / (std + LN_EPS)


def target(k, v, gamma, beta):
    """The normalised reconstruction target (docs/design.md §1):
    y = gamma (v - k - mean) / (std_unbiased(v - k) + eps) + beta. k, v [..., b, d] float32;
    gamma, beta broadcastable ([1, d], or [H, 1, d] for [B, H, L, d]). Returns y like k.
    The variance floor only matters for constant rows (e.g. padding), where sqrt' would be
    inf."""
    c, _, _, inv = _target_parts(k, v)
    return gamma * (c * inv) + beta


def target_backward(k, v, gamma, dy, col_sum=None):
    """VJP of `target` for the cotangent dy [b, d]: (dk, dv [b, d], dgamma, dbeta [1, d]).

    `col_sum` sums a token-major array like dy to gamma's shape (default: over the first
    axis, the 2-D case); the XLA op passes its own for [B, H, L, d] arrays and [H, 1, d]
    parameters."""
    d = k.shape[-1]
    col_sum = _col_sum if col_sum is None else col_sum
    c, var, std, inv = _target_parts(k, v)
    rhat = c * inv
    dgamma = col_sum(dy * rhat)
    dbeta = col_sum(dy)
    drhat = gamma * dy
    # rhat = c * inv, inv = 1 / (std + eps), std = sqrt(max(var, floor)), var = sum(c^2)/(d-1)
    dinv = _row_sum(drhat * c)
    dstd = -dinv * inv * inv
    dvar = jnp.where(var > 1e-30, dstd * 0.5 / std, 0.0)
    dc = drhat * inv + dvar * (2.0 / (d - 1)) * c
    dr = dc - _row_mean(dc)
    return -dr, dr, dgamma, dbeta


# --------------------------------------------------------------------------- forward


def _inner_grads(kind, state, k, y, gamma, beta):
    """Net forward on the keys and the closed-form per-token gradients w.r.t. Z1 (and Z2)."""
    w1, b1 = state[0], state[1]
    z1 = _mm(k, w1) + b1
    if kind == "linear":
        zhat, std = ln_stats(z1)
        resid = gamma * zhat + beta - y
        dz = ln_input_grad(gamma * resid, zhat, std)
        return dict(z1=z1, zhat=zhat, std=std, resid=resid, dz_last=dz, dz1=dz)
    w2, b2 = state[2], state[3]
    x2, gp, gpp = gelu_parts(z1)
    z2 = _mm(x2, w2) + b2
    zhat, std = ln_stats(z2)
    resid = gamma * zhat + beta - y
    dz2 = ln_input_grad(gamma * resid, zhat, std)
    p = _mm_nt(dz2, w2)
    return dict(z1=z1, x2=x2, gp=gp, gpp=gpp, zhat=zhat, std=std, resid=resid,
                dz_last=dz2, p=p, dz1=p * gp)


def _updated(kind, state, k, w, inner):
    a1 = w * inner["dz1"]
    new = [state[0] - _mm_tn(k, a1), state[1] - _col_sum(a1)]
    if kind == "mlp":
        a2 = w * inner["dz_last"]
        new += [state[2] - _mm_tn(inner["x2"], a2), state[3] - _col_sum(a2)]
    return tuple(new)


def _apply(kind, new, q):
    zq1 = _mm(q, new[0]) + new[1]
    if kind == "linear":
        return zq1, None
    xq2 = gelu(zq1)
    return _mm(xq2, new[2]) + new[3], (zq1, xq2)


def forward_step(kind, state, q, k, y, w, gamma, beta):
    """One update-then-apply step.

    Args:
      kind: "mlp" or "linear".
      state: (W1 [d, F], b1 [1, F]) + (W2 [F, d], b2 [1, d]) for "mlp", float32.
      q, k, y: [b, d] float32 (y: the normalised reconstruction target).
      w: [b, 1] float32, eta / b per token.
      gamma, beta: [1, d] float32, the inner LayerNorm's affine parameters.
    Returns:
      (new state tuple, z [b, d]) with z = q + LN(g(q; new state)).
    """
    inner = _inner_grads(kind, state, k, y, gamma, beta)
    new = _updated(kind, state, k, w, inner)
    zq, _ = _apply(kind, new, q)
    zhat_q, _ = ln_stats(zq)
    return new, q + gamma * zhat_q + beta


def advance_state(kind, state, k, y, w, gamma, beta):
    """The state update alone (what the backward's group recomputation needs)."""
    return _updated(kind, state, k, w, _inner_grads(kind, state, k, y, gamma, beta))


# --------------------------------------------------------------------------- backward


def backward_step(kind, state, q, k, y, w, gamma, beta, dz, dnew):
    """VJP of `forward_step` at `state`.

    Args:
      state, q, k, y, w, gamma, beta: as for `forward_step` (the state *before* the step).
      dz: [b, d] cotangent of z.
      dnew: tuple like `state`, cotangent of the new state.
    Returns:
      (dstate tuple, dq [b, d], dk [b, d], dy [b, d], dw [b, 1], dgamma [1, d], dbeta [1, d]).
    """
    residuals, new = step_residuals(kind, state, q, k, y, w, gamma, beta)
    return backward_from_residuals(kind, state, new, residuals, q, k, w, gamma, dz, dnew)


def step_residuals(kind, state, q, k, y, w, gamma, beta):
    """One step's forward, keeping what `backward_from_residuals` needs (arguments as
    `forward_step`).

    Returns (residuals, new state). The residuals are a small tuple of arrays (for TTT-MLP:
    the pre-activations Z1 and Zq1, P = dZ2 W2^T, the LayerNorm intermediates of the keys and
    queries), so a caller can compute them in one pass over a group of steps and stack them;
    the elementwise functions of Z1 and Zq1 (gelu, gelu', gelu'') are recomputed from them.
    """
    inner = _inner_grads(kind, state, k, y, gamma, beta)
    new = _updated(kind, state, k, w, inner)
    zq, acts = _apply(kind, new, q)
    zhat_q, std_q = ln_stats(zq)
    ln = (inner["zhat"], inner["std"], inner["resid"], inner["dz_last"], zhat_q, std_q)
    if kind == "mlp":
        return (inner["z1"], inner["p"], acts[0]) + ln, new
    return ln, new


def backward_from_residuals(kind, state, new, residuals, q, k, w, gamma, dz, dnew):
    """`backward_step` given `step_residuals(kind, state, q, k, y, w, gamma, beta)`, which
    returns (residuals, new)."""
    mlp = kind == "mlp"
    d = q.shape[-1]
    if mlp:
        z1, p, zq1 = residuals[:3]
        x2, gp, gpp = gelu_parts(z1)
        acts = (zq1, gelu(zq1))
        residuals = residuals[3:]
    zhat, std, resid, dz_last, zhat_q, std_q = residuals
    inner = dict(zhat=zhat, std=std, resid=resid, dz_last=dz_last)
    if mlp:
        inner.update(x2=x2, gp=gp, gpp=gpp, p=p, dz1=p * gp)
    else:
        inner["dz1"] = dz_last

    # ---- apply: z = q + gamma * LN(zq) + beta
    dgamma = _col_sum(dz * zhat_q)
    dbeta = _col_sum(dz)
    dzq = ln_input_grad(dz * gamma, zhat_q, std_q)
    dnew = list(dnew)
    if mlp:
        zq1, xq2 = acts
        dnew[2] = dnew[2] + _mm_tn(xq2, dzq)
        dnew[3] = dnew[3] + _col_sum(dzq)
        dzq1 = _mm_nt(dzq, new[2]) * gelu_grad(zq1)
    else:
        dzq1 = dzq
    dnew[0] = dnew[0] + _mm_tn(q, dzq1)
    dnew[1] = dnew[1] + _col_sum(dzq1)
    dq = dz + _mm_nt(dzq1, new[0])

    # ---- update: W1' = W1 - K^T (w dZ1), b1' = b1 - sum(w dZ1) (and W2', b2' with X2, dZ2)
    dz1 = inner["dz1"]
    dz_last = inner["dz_last"]
    dstate = list(dnew)
    da1 = -_mm(k, dnew[0]) - dnew[1]
    dk = -_mm_nt(w * dz1, dnew[0])
    dw = _row_sum(da1 * dz1)
    d_dz1 = w * da1                                  # cotangent of the inner gradient dZ1
    if mlp:
        x2, gp, gpp, p = inner["x2"], inner["gp"], inner["gpp"], inner["p"]
        da2 = -_mm(x2, dnew[2]) - dnew[3]
        dx2 = -_mm_nt(w * dz_last, dnew[2])
        dw = dw + _row_sum(da2 * dz_last)
        # dZ1 = (dZ2 W2^T) * gelu'(Z1)
        dp = d_dz1 * gp
        dz1_total = d_dz1 * p * gpp
        u = w * da2 + _mm(dp, state[2])              # cotangent of the inner gradient dZ2
        dstate[2] = dstate[2] + _mm_tn(dp, dz_last)
    else:
        u = d_dz1

    # ---- dZ_last = LN_backward(resid * gamma) at Z_last; resid = gamma * zhat + beta - y
    zhat, std, resid = inner["zhat"], inner["std"], inner["resid"]
    h = gamma * resid
    dh = ln_input_grad(u, zhat, std)
    dzhat = -(_row_mean(h * zhat) * u + _row_mean(u * zhat) * h) / std
    dstd = -_row_sum(u * dz_last) / std
    dresid = gamma * dh
    dgamma = dgamma + _col_sum(resid * dh + zhat * dresid)
    dbeta = dbeta + _col_sum(dresid)
    dy = -dresid
    dzhat = dzhat + gamma * dresid
    # zhat = (Z - mean Z) / std, std = sqrt(mean((Z - mean Z)^2) + eps)
    dstd = dstd - _row_sum(dzhat * zhat) / std
    dzc = dzhat / std + dstd * zhat * (1.0 / d)
    dz_net = dzc - _row_mean(dzc)                    # cotangent of Z_last through the loss

    if mlp:
        dstate[2] = dstate[2] + _mm_tn(x2, dz_net)
        dstate[3] = dstate[3] + _col_sum(dz_net)
        dx2 = dx2 + _mm_nt(dz_net, state[2])
        dz1_total = dz1_total + dx2 * gp
    else:
        dz1_total = dz_net
    dstate[0] = dstate[0] + _mm_tn(k, dz1_total)
    dstate[1] = dstate[1] + _col_sum(dz1_total)
    dk = dk + _mm_nt(dz1_total, state[0])
    return tuple(dstate), dq, dk, dy, dw, dgamma, dbeta
