"""Gated delta rule (Gated DeltaNet, docs/design.md §7), chunkwise-parallel with the UT transform.

Per head, with state `S` [d_k, d_v], log-decay `g_t <= 0`, write strength `beta_t` in [0, 1]:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t                          scale = d_k ** -0.5 by default

Chunk form (chunk of C tokens, state `S` at its start, in-chunk cumulative log-decay
`G_r = g_1 + ... + g_r`, decay ratios `D[r, i] = exp(G_r - G_i)` for i <= r): every token
writes `w_r = beta_r (v_r - exp(G_r) S^T k_r - sum_{i<r} D[r, i] (k_r . k_i) w_i)`, a unit
lower-triangular system `T w = beta (v - exp(G) k S)` with `T = I + diag(beta) strict(D * K K^T)`.
Solving it once per chunk (the UT transform, the WY representation of the product of
Householder-like factors; `T^-1` by recursive block inversion, matmuls only) gives `U = T^-1 diag(beta) V` and `Wk = T^-1 diag(beta exp(G)) K`,
both independent of `S`, so the sequential part is three small matmuls per chunk:

    w   = U - Wk S
    O   = scale * (exp(G) Q S + tril(D * Q K^T) w)
    S'  = exp(G_C) S + (exp(G_C - G) K)^T w

Everything runs in float32; the outputs take v's dtype. Sequences whose length is not a
multiple of the chunk are padded at the end with `beta = 0, g = 0` tokens, which leave the
state untouched, so outputs and the final state are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(q, k, v, g, beta, chunk_size, initial_state):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"gated_delta_rule: q and k must both be [B, H, L, d_k], got "
                         f"{q.shape} and {k.shape}")
    b, h, length, _ = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, h, length):
        raise ValueError(f"gated_delta_rule: v must be [B, H, L, d_v] = [{b}, {h}, {length}, d_v], "
                         f"got {v.shape}")
    for name, a in (("g", g), ("beta", beta)):
        if a.shape != (b, h, length):
            raise ValueError(f"gated_delta_rule: {name} must be [B, H, L] = {(b, h, length)}, "
                             f"got {a.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gated_delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
    want = (b, h, q.shape[-1], v.shape[-1])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"gated_delta_rule: initial_state must be [B, H, d_k, d_v] = {want}, "
                         f"got {initial_state.shape}")


def unit_lower_inverse(t: jax.Array) -> jax.Array:
    """Inverse of unit lower-triangular matrices t [..., C, C], with matmuls only.

    Recursive 2 x 2 block inversion from 1 x 1 blocks up ([[A, 0], [B, D]]^-1 =
    [[A^-1, 0], [-D^-1 B A^-1, D^-1]]), the numerically stable triangular inverse; on CPU it
    is ~10x faster than XLA's batched triangular solve, and its gradient is plain matmuls.
    C that is not a power of two is padded with an identity block.
    """
    c = t.shape[-1]
    size = 1 << max(0, (c - 1).bit_length())
    lead = t.shape[:-2]
    if size != c:
        eye = jnp.eye(size, dtype=t.dtype)
        t = eye.at[:c, :c].set(0.0) + jnp.pad(t, [(0, 0)] * len(lead) + [(0, size - c)] * 2)
    inv = jnp.ones(lead + (size, 1, 1), t.dtype)        # inverses of the 1 x 1 diagonal blocks
    s = 1
    while s < size:
        m = size // (2 * s)
        # The m diagonal blocks of size 2s; their lower-left s x s quarter couples the pair.
        blocks = jnp.diagonal(t.reshape(lead + (m, 2 * s, m, 2 * s)), axis1=-4, axis2=-2)
        lower = jnp.moveaxis(blocks, -1, -3)[..., s:, :s]
        a_inv, d_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        b_inv = -d_inv @ lower @ a_inv
        inv = jnp.concatenate([jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], -1),
                               jnp.concatenate([b_inv, d_inv], -1)], -2)
        s *= 2
    return inv[..., 0, :c, :c]


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                     *, chunk_size: int = 64, scale: float | None = None,
                     initial_state: jax.Array | None = None, return_state: bool = False):
    """Chunkwise gated delta rule.

    Args:
      q, k: [B, H, L, d_k], already L2-normalised (the recurrence is stable for |k| <= 1).
      v: [B, H, L, d_v].
      g: [B, H, L] log-decay (<= 0; decay exp(g)).
      beta: [B, H, L] write strength (usually a sigmoid, in [0, 1]).
      chunk_size: tokens per chunk C; any L works (padding at the end).
      scale: output scale, default d_k ** -0.5.
      initial_state: optional [B, H, d_k, d_v] state before the first token (zeros otherwise).
      return_state: also return the final state.
    Returns:
      o [B, H, L, d_v] in v's dtype; with `return_state`, (o, S_L) with S_L [B, H, d_k, d_v]
      float32.
    """
    _check(q, k, v, g, beta, chunk_size, initial_state)
    bsz, heads, length, dk = q.shape
    dv = v.shape[-1]
    out_dtype = v.dtype
    scale = dk ** -0.5 if scale is None else float(scale)
    c = chunk_size
    n = -(-length // c)
    pad = n * c - length

    def chunks(a, fill_axes):
        a = a.astype(jnp.float32)
        if pad:
            a = jnp.pad(a, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * fill_axes)
        return a.reshape(bsz, heads, n, c, *a.shape[3:])

    q, k, v = chunks(q, 1), chunks(k, 1), chunks(v, 1)
    g, beta = chunks(g, 0), chunks(beta, 0)

    cum = jnp.cumsum(g, axis=-1)                                   # [B, H, n, C]
    idx = jnp.arange(c)
    incl = idx[:, None] >= idx[None, :]                            # i <= r
    strict = idx[:, None] > idx[None, :]
    # exp only where i <= r: the upper triangle of G_r - G_i is positive and may overflow.
    decay = jnp.exp(jnp.where(incl, cum[..., :, None] - cum[..., None, :], -jnp.inf))

    kk = jnp.einsum("bhnrd,bhnid->bhnri", k, k)
    t_mat = jnp.eye(c, dtype=jnp.float32) + jnp.where(strict, decay * kk, 0.0) * beta[..., :, None]
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(cum))[..., None] * k], axis=-1)
    solved = unit_lower_inverse(t_mat) @ rhs
    u, wk = solved[..., :dv], solved[..., dv:]

    qk = jnp.einsum("bhnrd,bhnid->bhnri", q, k)
    attn = scale * decay * qk                                      # decay is 0 above the diagonal
    qg = (scale * jnp.exp(cum))[..., None] * q
    last = cum[..., -1:]
    kd = jnp.exp(last - cum)[..., None] * k
    decay_last = jnp.exp(last[..., 0])                             # [B, H, n]

    def step(state, xs):
        u_c, wk_c, attn_c, qg_c, kd_c, dl_c = xs
        w = u_c - jnp.einsum("bhrk,bhkv->bhrv", wk_c, state)
        o = jnp.einsum("bhrk,bhkv->bhrv", qg_c, state) + jnp.einsum("bhri,bhiv->bhrv", attn_c, w)
        state = dl_c[..., None, None] * state + jnp.einsum("bhrk,bhrv->bhkv", kd_c, w)
        return state, o

    lead = lambda a: jnp.moveaxis(a, 2, 0)  # noqa: E731  chunk axis first for the scan
    state0 = (jnp.zeros((bsz, heads, dk, dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
    state, o = jax.lax.scan(step, state0, (lead(u), lead(wk), lead(attn), lead(qg), lead(kd),
                                           lead(decay_last)))
    o = jnp.moveaxis(o, 0, 2).reshape(bsz, heads, n * c, dv)[:, :, :length].astype(out_dtype)
    return (o, state) if return_state else o
