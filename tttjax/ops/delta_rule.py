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
state untouched, so outputs and the final state are exact (the same skip is how a caller
leaves padding tokens out: `beta = 0, g = 0` there).

Packed sequences (`reset`, True at the first token of every sequence after the first): the
state returns to the initial state before such a token. In the chunk form that is a decay of
exactly 0 across the boundary without ever forming `log 0`: the decay ratios `D[r, i]` are 0
between tokens of different segments (so `T` is block diagonal and each segment's `w` is its
own), the cumulative decay `G` restarts at every segment start, and a token reads the carried
state `S` only if no segment starts between the chunk's start and it, else the initial state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(q, k, v, g, beta, chunk_size, initial_state, reset=None):
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
    if reset is not None and reset.shape != (b, length):
        raise ValueError(f"gated_delta_rule: reset must be [B, L] = {(b, length)}, got "
                         f"{reset.shape}")


def segment_local_cumsum(a: jax.Array, reset: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Inclusive cumulative sum over the last axis that restarts at every `reset` position,
    and the mask "no reset at or before this position" (the token still continues the state
    carried into the block).

    a [..., C] float; reset None or broadcastable bool [..., C] -> (cum [..., C], carried
    [..., C] bool). The restart subtracts the plain cumsum just before the last reset, so
    within a segment differences of `cum` are those of the plain cumsum.
    """
    cum = jnp.cumsum(a, axis=-1)
    if reset is None:
        return cum, jnp.ones(cum.shape, bool)
    reset = jnp.broadcast_to(reset, a.shape)
    pos = jnp.arange(a.shape[-1])
    last = jax.lax.cummax(jnp.where(reset, pos, -1), axis=a.ndim - 1)
    exclusive = cum - a
    base = jnp.take_along_axis(exclusive, jnp.maximum(last, 0), axis=-1)
    return cum - jnp.where(last >= 0, base, 0.0), last < 0


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
                     initial_state: jax.Array | None = None, return_state: bool = False,
                     reset: jax.Array | None = None):
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
      reset: optional [B, L] bool, True where a new packed sequence starts: the state is the
        initial state again before that token (the first token needs no flag).
    Returns:
      o [B, H, L, d_v] in v's dtype; with `return_state`, (o, S_L) with S_L [B, H, d_k, d_v]
      float32 (the state after the last token, i.e. of the last packed sequence).
    """
    _check(q, k, v, g, beta, chunk_size, initial_state, reset)
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
    packed = reset is not None
    if packed:
        # [B, 1, n, C]: the chunk padding starts no segment, so it stays in the last one
        reset = jnp.pad(reset.astype(bool), ((0, 0), (0, pad))).reshape(bsz, 1, n, c)
        segment = jnp.cumsum(reset, axis=-1)                       # in-chunk segment index

    cum, carried = segment_local_cumsum(g, reset if packed else None)   # [B, H, n, C]
    idx = jnp.arange(c)
    incl = idx[:, None] >= idx[None, :]                            # i <= r
    if packed:
        incl = incl & (segment[..., :, None] == segment[..., None, :])
    strict = incl & (idx[:, None] > idx[None, :])
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
    state0 = (jnp.zeros((bsz, heads, dk, dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))

    lead = lambda a: jnp.moveaxis(a, 2, 0)  # noqa: E731  chunk axis first for the scan
    if packed:
        # Tokens after an in-chunk segment start read the initial state instead of the carry;
        # only the chunk's last segment writes to the state it hands on.
        fresh = (~carried)[..., None]
        in_last = (segment == segment[..., -1:])[..., None]
        kd = jnp.where(in_last, kd, 0.0)
        fresh_w = jnp.einsum("bhnrk,bhkv->bhnrv", jnp.where(fresh, wk, 0.0), state0)
        u = u - fresh_w
        wk = jnp.where(fresh, 0.0, wk)
        fresh_o = (jnp.einsum("bhnrk,bhkv->bhnrv", jnp.where(fresh, qg, 0.0), state0))
        qg = jnp.where(fresh, 0.0, qg)
        keeps = carried[..., -1]                                   # [B, 1, n] no reset in chunk
        fresh_s = jnp.where(keeps, 0.0, decay_last)[..., None, None] * state0[:, :, None]
        decay_last = jnp.where(keeps, decay_last, 0.0)
    else:
        fresh_o = fresh_s = jnp.zeros((n,), jnp.float32)[:, None]   # unused placeholders

    def step(state, xs):
        u_c, wk_c, attn_c, qg_c, kd_c, dl_c, fo_c, fs_c = xs
        w = u_c - jnp.einsum("bhrk,bhkv->bhrv", wk_c, state)
        o = jnp.einsum("bhrk,bhkv->bhrv", qg_c, state) + jnp.einsum("bhri,bhiv->bhrv", attn_c, w)
        state = dl_c[..., None, None] * state + jnp.einsum("bhrk,bhrv->bhkv", kd_c, w)
        if packed:
            o, state = o + fo_c, state + fs_c
        return state, o

    fresh_o = lead(fresh_o) if packed else fresh_o
    fresh_s = lead(fresh_s) if packed else fresh_s
    state, o = jax.lax.scan(step, state0, (lead(u), lead(wk), lead(attn), lead(qg), lead(kd),
                                           lead(decay_last), fresh_o, fresh_s))
    o = jnp.moveaxis(o, 0, 2).reshape(bsz, heads, n * c, dv)[:, :, :length].astype(out_dtype)
    return (o, state) if return_state else o
