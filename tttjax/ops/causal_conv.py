"""Short depthwise causal convolution (the width-4 convs of Mamba 2 and Gated DeltaNet).

    y[t, c] = bias[c] + sum_j kernel[j, c] * x[t - K + 1 + j, c]      (x[s] = 0 for s < 0)

which is torch's `Conv1d(C, C, K, groups=C, padding=K - 1)(x)[..., :L]` with
`kernel[j, c] = weight[c, 0, j]`. Written as K shifted multiply-adds: no convolution
primitive, so it shards along channels and fuses with its neighbours.

The conv's state is the `K - 1` inputs before the first token (`initial_state` [B, K - 1, C],
zeros by default), so a sequence processed in pieces gives the same outputs as in one call.
Packed sequences (`segment_start` [B, L], each token's segment's first position): a tap that
would read before the token's segment start reads the initial state instead, exactly as if
the segment were a sequence of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                          initial_state: jax.Array | None = None,
                          segment_start: jax.Array | None = None,
                          num_tokens: jax.Array | None = None, return_state: bool = False):
    """x [B, L, C], kernel [K, C], bias [C] or None -> y [B, L, C] in x's dtype.

    Args:
      initial_state: optional [B, K - 1, C], the inputs before position 0 (oldest first).
      segment_start: optional int [B, L]: position where each token's packed sequence starts.
      num_tokens: optional int [B]: the final state is taken after this many tokens (the rest
        is padding moved to the end by the caller); default L.
      return_state: also return the state after the last (real) token: [B, K - 1, C], the
        last K - 1 inputs of the last segment, read like a tap of a next token.
    Returns:
      y, or (y, state) with `return_state`.
    """
    if x.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != x.shape[2]:
        raise ValueError(f"causal_depthwise_conv: need x [B, L, C] and kernel [K, C] with the same "
                         f"C, got {x.shape} and {kernel.shape}")
    width, (bsz, length, channels) = kernel.shape[0], x.shape
    hist_shape = (bsz, width - 1, channels)
    if initial_state is not None and initial_state.shape != hist_shape:
        raise ValueError(f"causal_depthwise_conv: initial_state must be [B, K - 1, C] = "
                         f"{hist_shape}, got {initial_state.shape}")
    if segment_start is not None and segment_start.shape != (bsz, length):
        raise ValueError(f"causal_depthwise_conv: segment_start must be [B, L] = "
                         f"{(bsz, length)}, got {segment_start.shape}")
    hist = (jnp.zeros(hist_shape, x.dtype) if initial_state is None
            else initial_state.astype(x.dtype))
    xp = jnp.concatenate([hist, x], axis=1)                     # position s at index K - 1 + s

    def tap(t, start, lag):
        """x[t - lag] of tokens at positions t [B, T] in segments starting at `start` [B, T]."""
        s = t - lag
        shifted = jnp.take_along_axis(xp, jnp.maximum(s + width - 1, 0)[..., None], axis=1)
        if segment_start is None:
            return shifted
        # before the segment start: the initial state's slot s - start (in -(K-1) .. -1)
        before = jnp.take_along_axis(hist, jnp.clip(s - start + width - 1, 0, width - 2)[..., None],
                                     axis=1) if width > 1 else shifted
        return jnp.where((s >= start)[..., None], shifted, before)

    kernel = kernel.astype(x.dtype)
    if segment_start is None:
        y = sum(xp[:, j:j + length] * kernel[j] for j in range(width))
    else:
        pos = jnp.broadcast_to(jnp.arange(length), (bsz, length))
        y = sum(tap(pos, segment_start, width - 1 - j) * kernel[j] for j in range(width))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if not return_state:
        return y
    n = jnp.full((bsz,), length) if num_tokens is None else jnp.asarray(num_tokens)
    # the K - 1 inputs a token at position n would read, oldest first
    nxt = jnp.broadcast_to(n[:, None], (bsz, width - 1))
    if segment_start is None:
        start = jnp.zeros_like(nxt)
    else:
        start = jnp.take_along_axis(segment_start, jnp.maximum(n - 1, 0)[:, None], axis=1)
        start = jnp.broadcast_to(jnp.where(n[:, None] > 0, start, 0), (bsz, width - 1))
    lags = jnp.arange(width - 1, 0, -1)[None, :]
    if width == 1:
        return y, hist
    s = nxt - lags
    shifted = jnp.take_along_axis(xp, (s + width - 1)[..., None], axis=1)
    before = jnp.take_along_axis(hist, jnp.clip(s - start + width - 1, 0, width - 2)[..., None],
                                 axis=1)
    return y, jnp.where((s >= start)[..., None], shifted, before)
