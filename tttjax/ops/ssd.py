"""Mamba 2's state space dual (SSD, docs/design.md §7), chunked.

Per head h (head dim P, state size N), with its group's B_t, C_t [N]:

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T          h_t [P, N]
    y_t = h_t C_t                                          (no D skip: the layer adds D x)

Chunk form (chunk of C tokens, in-chunk cumulative log-decay `G_r = sum_{s<=r} dt_s A`):

    y_r   = sum_{s<=r} exp(G_r - G_s) (C_r . B_s) dt_s x_s   +   exp(G_r) h_prev C_r
    h_end = exp(G_C) h_prev + sum_s exp(G_C - G_s) dt_s x_s B_s^T

The in-chunk terms and every chunk's own state contribution are computed for all chunks at
once; only the chunk-to-chunk carry (an elementwise multiply-add on [P, N]) is a scan.

Layouts: x [B, H, L, P], dt [B, H, L], A [H], B and C [B, G, L, N] with G groups dividing H;
head h reads group `h // (H // G)` (mamba_ssm's `repeat(B, "b l g n -> b l (g h) n")`).
Float32 arithmetic; y takes x's dtype. Lengths that are not a multiple of the chunk are
padded at the end with dt = 0 tokens (decay 1, no input), so outputs and final state are exact;
callers leave padding tokens out the same way (dt = 0 there).

Packed sequences (`reset`, True at the first token of every sequence after the first): the
state is the initial state again before such a token, a decay of exactly 0 across the
boundary formed without `log 0` (as in `tttjax.ops.delta_rule`): in-chunk decays are 0
between segments, `G` restarts at each segment start, a token reads the carried state only
if no segment starts between the chunk start and it, and only the chunk's last segment adds
to the state carried on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tttjax.ops.delta_rule import segment_local_cumsum


def _check(x, dt, a, b_mat, c_mat, chunk_size, initial_state, reset=None):
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [B, H, L, P], got shape {x.shape}")
    bsz, heads, length, p = x.shape
    if dt.shape != (bsz, heads, length):
        raise ValueError(f"ssd: dt must be [B, H, L] = {(bsz, heads, length)}, got {dt.shape}")
    if a.shape != (heads,):
        raise ValueError(f"ssd: A must be [H] = ({heads},), got {a.shape}")
    if b_mat.ndim != 4 or c_mat.shape != b_mat.shape:
        raise ValueError(f"ssd: B and C must both be [B, G, L, N], got {b_mat.shape} and {c_mat.shape}")
    if b_mat.shape[0] != bsz or b_mat.shape[2] != length:
        raise ValueError(f"ssd: B/C batch and length {b_mat.shape[0]}, {b_mat.shape[2]} must match "
                         f"x's {bsz}, {length}")
    groups = b_mat.shape[1]
    if heads % groups:
        raise ValueError(f"ssd: the number of groups {groups} must divide the number of heads {heads}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    want = (bsz, heads, p, b_mat.shape[3])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"ssd: initial_state must be [B, H, P, N] = {want}, got {initial_state.shape}")
    if reset is not None and reset.shape != (bsz, length):
        raise ValueError(f"ssd: reset must be [B, L] = {(bsz, length)}, got {reset.shape}")


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,  # noqa: N803
        chunk_size: int = 64, initial_state: jax.Array | None = None,
        return_state: bool = False, reset: jax.Array | None = None):
    """Chunked SSD scan.

    Args:
      x: [B, H, L, P] inputs.
      dt: [B, H, L] positive step sizes (softplus already applied, bias included).
      A: [H] negative decay rates (A = -exp(A_log)).
      B, C: [B, G, L, N] input / output projections of the state, G | H.
      chunk_size: tokens per chunk; any L works (padding at the end).
      initial_state: optional [B, H, P, N] state before the first token.
      return_state: also return the final state.
      reset: optional [B, L] bool, True where a new packed sequence starts (the state is the
        initial state again before that token).
    Returns:
      y [B, H, L, P] in x's dtype; with `return_state`, (y, h_L) with h_L [B, H, P, N] float32.
    """
    _check(x, dt, A, B, C, chunk_size, initial_state, reset)
    bsz, heads, length, p = x.shape
    groups, n_state = B.shape[1], B.shape[3]
    hg = heads // groups
    out_dtype = x.dtype
    c = chunk_size
    n = -(-length // c)
    pad = n * c - length

    def chunks(a, lead_shape, tail):
        a = a.astype(jnp.float32)
        if pad:
            a = jnp.pad(a, ((0, 0),) * len(lead_shape) + ((0, pad),) + ((0, 0),) * len(tail))
        return a.reshape(*lead_shape, n, c, *tail)

    # Heads are split into (group, head-in-group) so C B^T is formed once per group.
    xs = chunks(x.reshape(bsz, groups, hg, length, p), (bsz, groups, hg), (p,))
    dts = chunks(dt.reshape(bsz, groups, hg, length), (bsz, groups, hg), ())
    bs = chunks(B, (bsz, groups), (n_state,))                       # [B, G, n, C, N]
    cs = chunks(C, (bsz, groups), (n_state,))
    a = A.astype(jnp.float32).reshape(groups, hg)[None, :, :, None, None]

    packed = reset is not None
    if packed:
        # [B, 1, 1, n, C]: the chunk padding starts no segment, so it stays in the last one
        reset = jnp.pad(reset.astype(bool), ((0, 0), (0, pad))).reshape(bsz, 1, 1, n, c)
        segment = jnp.cumsum(reset, axis=-1)
    cum, carried = segment_local_cumsum(dts * a, reset if packed else None)  # [B, G, Hg, n, C]
    idx = jnp.arange(c)
    incl = idx[:, None] >= idx[None, :]
    if packed:
        incl = incl & (segment[..., :, None] == segment[..., None, :])
    # exp only on the lower triangle: G_r - G_s > 0 above it and could overflow.
    decay = jnp.exp(jnp.where(incl, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    cb = jnp.einsum("bgnrs,bgnis->bgnri", cs, bs)                   # [B, G, n, C, C]
    xdt = xs * dts[..., None]
    y = jnp.einsum("bgjnri,bgjnip->bgjnrp", decay * cb[:, :, None], xdt)

    last = cum[..., -1:]
    to_end = jnp.exp(last - cum)
    if packed:
        to_end = jnp.where(segment == segment[..., -1:], to_end, 0.0)
    # Each chunk's own contribution to the state at its end, all chunks at once.
    contrib = jnp.einsum("bgjnsp,bgnsk->bgjnpk", xdt * to_end[..., None], bs)
    chunk_decay = jnp.exp(last[..., 0])                              # [B, G, Hg, n]
    h0 = (jnp.zeros((bsz, groups, hg, p, n_state), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32).reshape(bsz, groups, hg, p, n_state))
    if packed:
        keeps = carried[..., -1]                                     # no segment starts in chunk
        contrib = contrib + jnp.where(keeps, 0.0, chunk_decay)[..., None, None] * h0[:, :, :, None]
        chunk_decay = jnp.where(keeps, chunk_decay, 0.0)

    def carry(h, inputs):
        dec, add = inputs
        return dec[..., None, None] * h + add, h                     # emit the state *before*

    h_end, h_prev = jax.lax.scan(carry, h0, (jnp.moveaxis(chunk_decay, 3, 0),
                                             jnp.moveaxis(contrib, 3, 0)))
    h_prev = jnp.moveaxis(h_prev, 0, 3)                              # [B, G, Hg, n, P, N]
    read = jnp.einsum("bgjnpk,bgnrk->bgjnrp", h_prev, cs)
    if packed:
        fresh = jnp.einsum("bgjpk,bgnrk->bgjnrp", h0, cs)
        read = jnp.where(carried[..., None], read, fresh)
    y = y + jnp.exp(cum)[..., None] * read

    y = y.reshape(bsz, heads, n * c, p)[:, :, :length].astype(out_dtype)
    if return_state:
        return y, h_end.reshape(bsz, heads, p, n_state)
    return y
