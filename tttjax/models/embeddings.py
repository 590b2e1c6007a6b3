"""CogVideoX's fixed encodings: timestep sinusoids, 3D sin-cos positions, pipeline RoPE grid.

All three reproduce diffusers numerics (`get_timestep_embedding`, `get_3d_sincos_pos_embed`,
and the `CogVideoXPipeline._prepare_rotary_positional_embeddings` grid) so imported weights
see exactly the inputs they were trained with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tttjax.ops.rope import rope_1d


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """DDPM sinusoidal embedding of (integer or fractional) timesteps.

    Args:
      timesteps: [B] any numeric dtype.
      dim: embedding width (odd widths get one zero column, as in diffusers).
      flip_sin_to_cos: `[cos, sin]` order when True, `[sin, cos]` otherwise.
      freq_shift: diffusers' `downscale_freq_shift`.
    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M, dim] float64 `[sin, cos]` table (MAE convention), positions [M]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d_positions(width: int, frames: int, grid_h: int, grid_w: int, *,
                        spatial_interpolation_scale: float = 1.875,
                        temporal_interpolation_scale: float = 1.0) -> np.ndarray:
    """CogVideoX-2B's fixed 3D sin-cos embedding of the video tokens.

    The first `width/4` features encode time, the remaining `3 width/4` space; of those the
    first half encodes the column and the second half the row (diffusers' `meshgrid(w, h,
    indexing="xy")` feeds the column grid to the half it calls `emb_h`). Computed in
    float64 like diffusers, returned as float32.

    Returns:
      [frames * grid_h * grid_w, width] float32, tokens in (t, h, w) order.
    """
    if width % 16:
        raise ValueError(f"sin-cos positions need a width divisible by 16, got {width}")
    spatial, temporal = 3 * width // 4, width // 4
    rows = np.arange(grid_h, dtype=np.float32) / np.float32(spatial_interpolation_scale)
    cols = np.arange(grid_w, dtype=np.float32) / np.float32(spatial_interpolation_scale)
    col_grid = np.broadcast_to(cols[None, :], (grid_h, grid_w)).reshape(-1)
    row_grid = np.broadcast_to(rows[:, None], (grid_h, grid_w)).reshape(-1)
    space = np.concatenate([_sincos_1d(spatial // 2, col_grid),
                            _sincos_1d(spatial // 2, row_grid)], axis=1)       # [hw, 3D/4]
    times = np.arange(frames, dtype=np.float32) / np.float32(temporal_interpolation_scale)
    time = _sincos_1d(temporal, times)                                       # [T, D/4]
    table = np.concatenate([
        np.broadcast_to(time[:, None, :], (frames, grid_h * grid_w, temporal)),
        np.broadcast_to(space[None, :, :], (frames, grid_h * grid_w, spatial))], axis=-1)
    return table.reshape(frames * grid_h * grid_w, width).astype(np.float32)


def pipeline_rope_positions(grid_h: int, grid_w: int, base_h: int, base_w: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Row/column RoPE positions the CogVideoX pipeline uses for a `grid_h x grid_w` grid.

    The pipeline fits the grid into the training grid `base_h x base_w` (the transformer's
    `sample_height // patch`, `sample_width // patch`) and spreads positions linearly over
    the fitted crop. On the training grid (30 x 45 for 480 x 720 video) they are the
    integers `0..n-1`. Returned as float32, computed like `torch.linspace` in float32.
    """
    ratio = grid_h / grid_w
    if ratio > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
    else:
        resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
    top = int(round((base_h - resize_h) / 2.0))
    left = int(round((base_w - resize_w) / 2.0))

    def spread(start, stop, n):
        end = np.float32(stop * (n - 1) / n)
        if n == 1:
            return np.array([start], np.float32)
        step = (end - np.float32(start)) / np.float32(n - 1)
        # torch.linspace fills the first half from the start and the second from the end.
        idx = np.arange(n)
        fwd = np.float32(start) + step * idx.astype(np.float32)
        bwd = end - step * (n - 1 - idx).astype(np.float32)
        return np.where(idx < n // 2, fwd, bwd).astype(np.float32)

    return spread(top, top + resize_h, grid_h), spread(left, left + resize_w, grid_w)


def rope_3d_at(positions_t, positions_h, positions_w, head_dim: int, theta: float = 10000.0
               ) -> tuple[jax.Array, jax.Array]:
    """3D RoPE tables at explicit per-axis positions, tokens in (t, h, w) order.

    Head-dim split t:h:w = d/4 : 3d/8 : 3d/8 (CogVideoX). `tttjax.ops.rope.rope_3d` is the
    integer-grid special case.

    Returns:
      (cos, sin), each [T*H*W, head_dim] float32.
    """
    split = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    if sum(split) != head_dim:
        raise ValueError(f"3D RoPE needs head_dim divisible by 8, got {head_dim}")
    t, h, w = len(positions_t), len(positions_h), len(positions_w)
    tabs = [rope_1d(n, pos, theta) for n, pos in zip(split, (positions_t, positions_h, positions_w))]

    def grid_cat(at, ah, aw):
        at = jnp.broadcast_to(at[:, None, None, :], (t, h, w, split[0]))
        ah = jnp.broadcast_to(ah[None, :, None, :], (t, h, w, split[1]))
        aw = jnp.broadcast_to(aw[None, None, :, :], (t, h, w, split[2]))
        return jnp.concatenate([at, ah, aw], axis=-1).reshape(t * h * w, head_dim)

    return (grid_cat(tabs[0][0], tabs[1][0], tabs[2][0]),
            grid_cat(tabs[0][1], tabs[1][1], tabs[2][1]))
