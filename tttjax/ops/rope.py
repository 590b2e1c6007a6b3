"""Rotary position embeddings (RoPE), CogVideoX convention.

Frequencies are repeated per pair (`[f0, f0, f1, f1, ...]`) and rotation acts on adjacent
pairs `(x0, x1), (x2, x3), ...`, exactly as diffusers' `get_3d_rotary_pos_embed` +
`apply_rotary_emb(use_real_unbind_dim=-1)`, so rotated q/k match CogVideoX bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def rope_1d(dim: int, positions: np.ndarray | jnp.ndarray, theta: float = 10000.0
            ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables for one axis.

    Args:
      dim: even number of features rotated by this axis.
      positions: [N] float or int positions.
    Returns:
      (cos, sin), each [N, dim] float32, frequencies repeated per pair.
    """
    if dim % 2:
        raise ValueError(f"rope_1d: dim must be even, got {dim}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32)[: dim // 2] / dim))
    angles = jnp.asarray(positions, jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.repeat(angles, 2, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rope_3d(grid: Sequence[int], head_dim: int, *, split: Sequence[int] | None = None,
            theta: float = 10000.0, t_offset: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """3D RoPE tables for a `(T, H, W)` token grid flattened in (t, h, w) order.

    The head dim is split t : h : w as in CogVideoX (`d/4, 3d/8, 3d/8`; 16:24:24 for
    d = 64) unless `split` is given; integer positions `t_offset + 0..T-1`, `0..H-1`,
    `0..W-1`.

    Returns:
      (cos, sin), each [T*H*W, head_dim] float32.
    """
    t, h, w = grid
    if split is None:
        split = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    if sum(split) != head_dim:
        raise ValueError(f"rope_3d: split {tuple(split)} must sum to head_dim {head_dim}")
    ct, st = rope_1d(split[0], np.arange(t) + t_offset, theta)
    ch, sh = rope_1d(split[1], np.arange(h), theta)
    cw, sw = rope_1d(split[2], np.arange(w), theta)

    def grid_cat(at, ah, aw):
        at = jnp.broadcast_to(at[:, None, None, :], (t, h, w, split[0]))
        ah = jnp.broadcast_to(ah[None, :, None, :], (t, h, w, split[1]))
        aw = jnp.broadcast_to(aw[None, None, :, :], (t, h, w, split[2]))
        return jnp.concatenate([at, ah, aw], axis=-1).reshape(t * h * w, head_dim)

    return grid_cat(ct, ch, cw), grid_cat(st, sh, sw)


def identity_rope(length: int, head_dim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Tables that leave tokens unrotated (for text tokens in a mixed sequence): [L, d]."""
    return jnp.ones((length, head_dim), jnp.float32), jnp.zeros((length, head_dim), jnp.float32)


def flip_rope(rope: tuple[jnp.ndarray, jnp.ndarray] | None, index=None
              ) -> tuple[jnp.ndarray, jnp.ndarray] | None:
    """RoPE tables reordered along the token axis like the tokens of a reversed pass.

    The one place tables are flipped (docs/design.md §2): the bidirectional mixers' reversed
    pass (tables travel with their tokens) and the DiT's `reverse_rope="position"` tables
    (the (t, h, w)-ordered video tables flipped, so token (t, h, w) is rotated as
    (T-1-t, H-1-h, W-1-w)).

    Args:
      rope: (cos, sin), each [L, d] or [B, L, d] (tokens on the second-to-last axis), or None.
      index: optional [L] int permutation (row i of the result is row `index[i]`); None
        reverses the tokens (`index = L-1, ..., 0`).
    Returns:
      (cos, sin) of the same shapes and dtypes, or None when `rope` is None.
    """
    if rope is None:
        return None
    cos, sin = rope
    axis = cos.ndim - 2
    if index is None:
        return jnp.flip(cos, axis), jnp.flip(sin, axis)
    return jnp.take(cos, index, axis=axis), jnp.take(sin, index, axis=axis)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates adjacent feature pairs of `x`.

    Args:
      x: [..., L, d] any float dtype.
      cos, sin: [L, d] or broadcastable to x (e.g. [B, 1, L, d]).
    Returns:
      [..., L, d] in x's dtype; the rotation itself runs in float32.
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)
