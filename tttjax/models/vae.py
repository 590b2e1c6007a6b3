"""CogVideoX's 3D causal VAE (diffusers `AutoencoderKLCogVideoX`) in Flax NNX.

Public layout is `[B, T, C, H, W]` (frames first, like the DiT latents); diffusers uses
`[B, C, T, H, W]`. Internally everything is channels-last `[B, T, H, W, C]`.

Numerics follow diffusers exactly, including two things that make frame batching part of
the model rather than an implementation detail:

* Diffusers encodes in *frame batches* of 8 video frames and decodes in batches of 2 latent
  frames (the first batch also takes the `T % batch` remainder frames), carrying a causal
  conv cache between batches. GroupNorm statistics, the temporal 2x down/up-sampling and the
  latent resizing of the decoder's spatial norm are computed *per frame batch*, so the result
  depends on the batching. We reproduce it: every frame batch is a *segment* whose length is
  tracked level by level; those ops run per segment, while the causal convolutions run over
  the whole (tile of the) sequence, which is what the conv cache computes.
* A *temporal tile* is a run of whole frame batches processed by one jitted call; the causal
  conv cache is carried from tile to tile. Tiled and untiled processing therefore compute
  the same function, and memory is bounded by the tile, not by the video length.

Optional spatial tiling reproduces diffusers' `enable_tiling()` (overlapping spatial tiles
blended linearly); unlike temporal tiling it changes the result, exactly as in diffusers.

Latent scaling: `encode` returns the raw posterior; the DiT works on `z * scaling_factor`
and `decode` expects raw latents (`z_dit / scaling_factor`), as in diffusers' pipelines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.logical_params import logical_init
from tttjax.sharding import with_logical_constraint

Segments = tuple[int, ...]  # lengths of consecutive frame batches along T
Cache = dict[str, Any]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}

_SPATIAL_CONV_AXES = (None, None, None, "conv", "conv")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of `AutoencoderKLCogVideoX` (field names as in its config.json).

    Defaults are CogVideoX's (8x spatial, 4x temporal compression, 16 latent channels).
    `sample_frames_per_batch` / `latent_frames_per_batch` are diffusers' frame batch sizes
    (`num_sample_frames_batch_size` = 8, `num_latent_frames_batch_size` = 2); they change
    the numbers, so keep them unless you know the checkpoint was trained otherwise.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    sample_frames_per_batch: int = 8
    latent_frames_per_batch: int = 2

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        self.validate()

    def validate(self) -> None:
        if not self.block_out_channels:
            raise ValueError("VAEConfig: block_out_channels is empty; give one width per block")
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"VAEConfig: act_fn {self.act_fn!r} unsupported; use one of "
                             f"{sorted(_ACTIVATIONS)}")
        bad = [c for c in (*self.block_out_channels,) if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig: norm_num_groups={self.norm_num_groups} must divide every "
                             f"block width, not {bad}")
        ratio = self.temporal_compression_ratio
        if ratio < 1 or math.log2(ratio) != int(math.log2(ratio)):
            raise ValueError("VAEConfig: temporal_compression_ratio must be a power of two, got "
                             f"{self.temporal_compression_ratio}")
        if (self.use_quant_conv or self.use_post_quant_conv) and self.latent_channels != self.out_channels:
            raise ValueError("VAEConfig: diffusers sizes quant_conv/post_quant_conv by out_channels, "
                             "so they need latent_channels == out_channels; disable them")
        if self.sample_frames_per_batch < 1 or self.latent_frames_per_batch < 1:
            raise ValueError("VAEConfig: frame batch sizes must be positive")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compress_level(self) -> int:
        return int(math.log2(self.temporal_compression_ratio))


@dataclasses.dataclass(frozen=True)
class SpatialTiling:
    """Diffusers' `enable_tiling()` settings (sizes in video pixels).

    `None` sizes default to half of the config's `sample_height` / `sample_width`, as in
    diffusers. Tiles overlap by the given fractions and are blended linearly.
    """

    tile_sample_min_height: int | None = None
    tile_sample_min_width: int | None = None
    tile_overlap_factor_height: float = 1 / 6
    tile_overlap_factor_width: float = 1 / 5


def frame_batches(num_frames: int, per_batch: int) -> Segments:
    """Diffusers' frame batches: the first takes the `num_frames % per_batch` remainder.

    E.g. 49 frames, per_batch 8 -> (9, 8, 8, 8, 8, 8); 13 latents, per_batch 2 -> (3, 2, 2, 2, 2, 2).
    Fewer than `2 * per_batch` frames form one batch.
    """
    if num_frames < 1:
        raise ValueError(f"frame_batches: need at least one frame, got {num_frames}")
    n = max(num_frames // per_batch, 1)
    if n == 1:
        return (num_frames,)
    return (per_batch + num_frames % per_batch,) + (per_batch,) * (n - 1)


# ----------------------------------------------------------------------------- segments


def _segment_runs(*lengths: Segments) -> list[tuple[tuple[int, ...], int]]:
    """Consecutive segments whose lengths agree in every list: [(lengths, count)]."""
    runs: list[list[Any]] = []
    for lens in zip(*lengths, strict=True):
        if runs and runs[-1][0] == lens:
            runs[-1][1] += 1
        else:
            runs.append([lens, 1])
    return [(tuple(lens), n) for lens, n in runs]


def _map_segments(fn: Callable[..., jax.Array], xs: Sequence[jax.Array],
                  lengths: Sequence[Segments]) -> jax.Array:
    """Applies `fn` to every frame segment separately.

    xs: arrays [B, T_i, ...] whose axis 1 is cut into segments `lengths[i]` (sum T_i).
    fn: gets [B * n, L_i, ...] (n equal-length segments batched together) and returns
    [B * n, L_out, ...]. Returns the segments' outputs concatenated: [B, sum L_out, ...].
    """
    for x, segs in zip(xs, lengths, strict=True):
        if sum(segs) != x.shape[1]:
            raise ValueError(f"segments {segs} do not cover the {x.shape[1]} frames of the input")
    batch = xs[0].shape[0]
    offsets = [0] * len(xs)
    outs = []
    for lens, n in _segment_runs(*lengths):
        parts = []
        for k, (x, length) in enumerate(zip(xs, lens)):
            part = x[:, offsets[k]: offsets[k] + n * length]
            offsets[k] += n * length
            parts.append(part.reshape((batch * n, length) + x.shape[2:]))
        y = fn(*parts)
        outs.append(y.reshape((batch, n * y.shape[1]) + y.shape[2:]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's 'nearest' interpolation: floor(i * in / out) in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def _nearest_resize(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if out_size == in_size:
        return x
    if out_size % in_size == 0:
        return jnp.repeat(x, out_size // in_size, axis=axis)
    return jnp.take(x, _nearest_indices(in_size, out_size), axis=axis)


def _time_downsample(x: jax.Array) -> jax.Array:
    """[N, L, ...] -> average of frame pairs; an odd first frame is kept as is."""
    if x.shape[1] % 2:
        first, rest = x[:, :1], x[:, 1:]
        if rest.shape[1] == 0:
            return first
        return jnp.concatenate([first, (rest[:, 0::2] + rest[:, 1::2]) / 2], axis=1)
    return (x[:, 0::2] + x[:, 1::2]) / 2


def _time_downsampled_length(length: int) -> int:
    return 1 + (length - 1) // 2 if length % 2 else length // 2


def _time_upsample(x: jax.Array) -> jax.Array:
    """[N, L, ...] -> nearest 2x in time; an odd first frame (L > 1) or a lone frame is kept."""
    length = x.shape[1]
    if length == 1:
        return x
    if length % 2:
        return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
    return jnp.repeat(x, 2, axis=1)


def _time_upsampled_length(length: int) -> int:
    if length == 1:
        return 1
    return 2 * length - 1 if length % 2 else 2 * length


# ----------------------------------------------------------------------------- layers


def _conv(cin: int, cout: int, kernel: tuple[int, ...], *, strides: int = 1, padding: Any,
          rngs: nnx.Rngs, dtype: Any, param_dtype: Any, precision: Any) -> nnx.Conv:
    axes = _SPATIAL_CONV_AXES[-len(kernel) - 2:]
    # torch's default conv init (kaiming-uniform with a = sqrt(5)); weights are usually imported.
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nnx.Conv(cin, cout, kernel, strides=strides, padding=padding, dtype=dtype,
                    param_dtype=param_dtype, precision=precision,
                    kernel_init=logical_init(init, axes),
                    bias_init=logical_init(nnx.initializers.zeros, ("conv",)), rngs=rngs)


def _group_norm(channels: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype: Any,
                param_dtype: Any) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                         use_fast_variance=False,
                         scale_init=logical_init(nnx.initializers.ones, ("norm",)),
                         bias_init=logical_init(nnx.initializers.zeros, ("norm",)),
                         rngs=rngs)


def _segment_norm(norm: nnx.GroupNorm, x: jax.Array, segs: Segments) -> jax.Array:
    """GroupNorm with statistics per frame segment (diffusers normalises each frame batch)."""
    return _map_segments(norm, (x,), (segs,))


class CausalConv3d(nnx.Module):
    """Conv3d, causal in time: pads with the previous tile's last `kt - 1` frames (the conv
    cache) or, at the start of the video, with copies of the first frame.

    Spatial zero padding `(k - 1) // 2` as diffusers' `CogVideoXCausalConv3d`.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        self.time_kernel = kernel_size
        pad = (kernel_size - 1) // 2
        self.conv = _conv(cin, cout, (kernel_size,) * 3, padding=((0, 0), (pad, pad), (pad, pad)),
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, T, H, W, Cin]; cache: [B, kt - 1, H, W, Cin] or None.

        Returns ([B, T, H, W, Cout], new cache) (cache None for kernel 1).
        """
        if self.time_kernel == 1:
            return self.conv(x), None
        if cache is None:
            cache = jnp.repeat(x[:, :1], self.time_kernel - 1, axis=1)
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self.conv(x), x[:, x.shape[1] - self.time_kernel + 1:]


class SpatialNorm3D(nnx.Module):
    """Decoder norm conditioned on the latents: GroupNorm(f) * conv_y(zq) + conv_b(zq).

    zq is resized (nearest) to f's frames per segment, an odd segment's first frame
    separately. The 1x1x1 convs are applied before the resize, which commutes with it.
    """

    def __init__(self, f_channels: int, zq_channels: int, groups: int, *, rngs: nnx.Rngs,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm_layer = _group_norm(f_channels, groups, 1e-6, **kw)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1, precision=precision, **kw)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1, precision=precision, **kw)

    def __call__(self, f: jax.Array, segs: Segments, zq: jax.Array, zq_segs: Segments) -> jax.Array:
        channels = f.shape[-1]
        yb = jnp.concatenate([self.conv_y(zq)[0], self.conv_b(zq)[0]], axis=-1)

        def resize(f_seg, z_seg):
            frames, height, width = f_seg.shape[1:4]
            z_seg = _nearest_resize(_nearest_resize(z_seg, 2, height), 3, width)
            if frames > 1 and frames % 2:
                return jnp.concatenate(
                    [_nearest_resize(z_seg[:, :1], 1, 1),
                     _nearest_resize(z_seg[:, 1:], 1, frames - 1)], axis=1)
            return _nearest_resize(z_seg, 1, frames)

        yb = _map_segments(resize, (f, yb), (segs, zq_segs))
        norm_f = _segment_norm(self.norm_layer, f, segs)
        return norm_f * yb[..., :channels] + yb[..., channels:]


class ResnetBlock3D(nnx.Module):
    """norm -> act -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, *, groups: int, eps: float, act_fn: str,
                 spatial_norm_dim: int | None, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act_fn = act_fn
        if spatial_norm_dim is None:
            self.norm1 = _group_norm(cin, groups, eps, **kw)
            self.norm2 = _group_norm(cout, groups, eps, **kw)
        else:
            self.norm1 = SpatialNorm3D(cin, spatial_norm_dim, groups, precision=precision, **kw)
            self.norm2 = SpatialNorm3D(cout, spatial_norm_dim, groups, precision=precision, **kw)
        self.conv1 = CausalConv3d(cin, cout, 3, precision=precision, **kw)
        self.conv2 = CausalConv3d(cout, cout, 3, precision=precision, **kw)
        self.conv_shortcut = (_conv(cin, cout, (1, 1, 1), padding="VALID", precision=precision, **kw)
                              if cin != cout else None)

    def _norm(self, norm, x, segs, zq, zq_segs):
        if zq is None:
            return _segment_norm(norm, x, segs)
        return norm(x, segs, zq, zq_segs)

    def __call__(self, x: jax.Array, segs: Segments, cache: Cache | None,
                 zq: jax.Array | None = None, zq_segs: Segments = ()) -> tuple[jax.Array, Cache]:
        cache = cache or {}
        act = _ACTIVATIONS[self.act_fn]
        h = act(self._norm(self.norm1, x, segs, zq, zq_segs))
        h, c1 = self.conv1(h, cache.get("conv1"))
        h = act(self._norm(self.norm2, h, segs, zq, zq_segs))
        h, c2 = self.conv2(h, cache.get("conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, {"conv1": c1, "conv2": c2}


def _resnets(cin: int, cout: int, num: int, **kw) -> nnx.List:
    return nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, **kw) for i in range(num)])


def _run_resnets(resnets, x, segs, cache, zq=None, zq_segs=()):
    cache = cache or {}
    new = {}
    for i, resnet in enumerate(resnets):
        x, new[f"resnet_{i}"] = resnet(x, segs, cache.get(f"resnet_{i}"), zq, zq_segs)
    return x, new


def _per_frame(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Applies a 2D op to every frame: [B, T, H, W, C] -> [B, T, H', W', C']."""
    b, t = x.shape[:2]
    y = fn(x.reshape((b * t,) + x.shape[2:]))
    return y.reshape((b, t) + y.shape[1:])


class Downsample3D(nnx.Module):
    """Optional per-segment 2x temporal average pooling, then a stride-2 3x3 conv per frame
    (zero padding on the bottom/right only, as diffusers)."""

    def __init__(self, channels: int, compress_time: bool, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        self.compress_time = compress_time
        self.conv = _conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)

    def __call__(self, x: jax.Array, segs: Segments) -> tuple[jax.Array, Segments]:
        if self.compress_time:
            x = _map_segments(_time_downsample, (x,), (segs,))
            segs = tuple(_time_downsampled_length(s) for s in segs)
        return _per_frame(self.conv, x), segs


class Upsample3D(nnx.Module):
    """Nearest 2x upsampling (also in time per segment if compress_time), then a 3x3 conv."""

    def __init__(self, channels: int, compress_time: bool, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        self.compress_time = compress_time
        self.conv = _conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype, precision=precision)

    def __call__(self, x: jax.Array, segs: Segments) -> tuple[jax.Array, Segments]:
        if self.compress_time:
            x = _map_segments(_time_upsample, (x,), (segs,))
            segs = tuple(_time_upsampled_length(s) for s in segs)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return _per_frame(self.conv, x), segs


class DownBlock3D(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, add_downsample: bool,
                 compress_time: bool, *, rngs: nnx.Rngs, **kw):
        self.resnets = _resnets(cin, cout, num_layers, spatial_norm_dim=None, rngs=rngs, **kw)
        conv_kw = {k: kw[k] for k in ("dtype", "param_dtype", "precision")}
        self.downsamplers = (nnx.List([Downsample3D(cout, compress_time, rngs=rngs, **conv_kw)])
                             if add_downsample else None)

    def __call__(self, x, segs, cache):
        x, new = _run_resnets(self.resnets, x, segs, cache)
        if self.downsamplers is not None:
            x, segs = self.downsamplers[0](x, segs)
        return x, segs, new


class UpBlock3D(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, add_upsample: bool,
                 compress_time: bool, spatial_norm_dim: int, *, rngs: nnx.Rngs, **kw):
        self.resnets = _resnets(cin, cout, num_layers, spatial_norm_dim=spatial_norm_dim,
                                rngs=rngs, **kw)
        conv_kw = {k: kw[k] for k in ("dtype", "param_dtype", "precision")}
        self.upsamplers = (nnx.List([Upsample3D(cout, compress_time, rngs=rngs, **conv_kw)])
                           if add_upsample else None)

    def __call__(self, x, segs, cache, zq, zq_segs):
        x, new = _run_resnets(self.resnets, x, segs, cache, zq, zq_segs)
        if self.upsamplers is not None:
            x, segs = self.upsamplers[0](x, segs)
        return x, segs, new


class MidBlock3D(nnx.Module):
    def __init__(self, channels: int, spatial_norm_dim: int | None, *, rngs: nnx.Rngs, **kw):
        self.resnets = _resnets(channels, channels, 2, spatial_norm_dim=spatial_norm_dim,
                                rngs=rngs, **kw)

    def __call__(self, x, segs, cache, zq=None, zq_segs=()):
        return _run_resnets(self.resnets, x, segs, cache, zq, zq_segs)


class Encoder3D(nnx.Module):
    """Video [B, T, H, W, Cin] -> posterior moments [B, T', H/s, W/s, 2 * latent]."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
        res_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, **kw)
        widths = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], 3, rngs=rngs, **kw)
        blocks = []
        for i, width in enumerate(widths):
            blocks.append(DownBlock3D(widths[max(i - 1, 0)], width, cfg.layers_per_block,
                                      add_downsample=i != len(widths) - 1,
                                      compress_time=i < cfg.temporal_compress_level,
                                      rngs=rngs, **res_kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock3D(widths[-1], None, rngs=rngs, **res_kw)
        self.norm_out = _group_norm(widths[-1], cfg.norm_num_groups, 1e-6, rngs=rngs,
                                    dtype=dtype, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.latent_channels, 3, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, segs: Segments, cache: Cache | None
                 ) -> tuple[jax.Array, Segments, Cache]:
        cache = cache or {}
        new: Cache = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, segs, new[f"down_block_{i}"] = block(h, segs, cache.get(f"down_block_{i}"))
        h, new["mid_block"] = self.mid_block(h, segs, cache.get("mid_block"))
        h = jax.nn.silu(_segment_norm(self.norm_out, h, segs))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, segs, new


class Decoder3D(nnx.Module):
    """Latents [B, T', h, w, latent] -> video [B, T, h*s, w*s, Cout]; every norm is spatially
    conditioned on the (tile's) latents."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
        res_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, **kw)
        widths = tuple(reversed(cfg.block_out_channels))
        zdim = cfg.latent_channels
        self.conv_in = CausalConv3d(zdim, widths[0], 3, rngs=rngs, **kw)
        self.mid_block = MidBlock3D(widths[0], zdim, rngs=rngs, **res_kw)
        blocks = []
        for i, width in enumerate(widths):
            blocks.append(UpBlock3D(widths[max(i - 1, 0)], width, cfg.layers_per_block + 1,
                                    add_upsample=i != len(widths) - 1,
                                    compress_time=i < cfg.temporal_compress_level,
                                    spatial_norm_dim=zdim, rngs=rngs, **res_kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = SpatialNorm3D(widths[-1], zdim, cfg.norm_num_groups, rngs=rngs, **kw)
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels, 3, rngs=rngs, **kw)

    def __call__(self, z: jax.Array, segs: Segments, cache: Cache | None
                 ) -> tuple[jax.Array, Segments, Cache]:
        cache = cache or {}
        new: Cache = {}
        zq, zq_segs = z, segs
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, segs, cache.get("mid_block"), zq, zq_segs)
        for i, block in enumerate(self.up_blocks):
            h, segs, new[f"up_block_{i}"] = block(h, segs, cache.get(f"up_block_{i}"), zq, zq_segs)
        h = jax.nn.silu(self.norm_out(h, segs, zq, zq_segs))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, segs, new


# ----------------------------------------------------------------------------- model


class CogVideoXVAE(nnx.Module):
    """CogVideoX 3D causal VAE. Parameter paths mirror diffusers' state-dict keys.

    Public arrays are `[B, T, C, H, W]`. `encode(video)` -> `(mean, logvar)` of the
    posterior, `decode(latents)` -> video; both run in temporal tiles of whole frame
    batches (`tile_batches` per jitted call, None = everything at once) with the causal
    conv cache carried across tiles, so results do not depend on the tile size.
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.encoder = Encoder3D(config, **kw)
        self.decoder = Decoder3D(config, **kw)
        conv_kw = dict(padding="VALID", rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                       precision=precision)
        out2 = 2 * config.out_channels
        self.quant_conv = (_conv(out2, out2, (1, 1, 1), **conv_kw)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (_conv(config.out_channels, config.out_channels, (1, 1, 1), **conv_kw)
                                if config.use_post_quant_conv else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    # -- one tile, channels-last, inside jit ------------------------------------------

    def encode_tile(self, x: jax.Array, segs: Segments, cache: Cache | None
                    ) -> tuple[jax.Array, Cache]:
        """x: [B, T, H, W, Cin] frames of whole frame batches `segs`; cache from the
        previous tile or None at the video start. Returns the posterior moments
        [B, T', h, w, 2 * latent] (mean, then unclamped logvar) and the new cache."""
        x = with_logical_constraint(x, ("activation_batch", None, None, None, None))
        h, _, cache = self.encoder(x, segs, cache)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h, cache

    def decode_tile(self, z: jax.Array, segs: Segments, cache: Cache | None
                    ) -> tuple[jax.Array, Cache]:
        """z: [B, T', h, w, latent] (raw, unscaled latents of whole frame batches `segs`).
        Returns ([B, T, H, W, Cout], new cache)."""
        z = with_logical_constraint(z, ("activation_batch", None, None, None, None))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h, _, cache = self.decoder(z, segs, cache)
        return h, cache

    # -- whole videos ------------------------------------------------------------------

    def encode(self, video: Any, *, tile_batches: int | None = 4,
               spatial_tiling: SpatialTiling | None = None) -> tuple[jax.Array, jax.Array]:
        """Encodes videos to their diagonal Gaussian posterior.

        Args:
          video: [B, T, C, H, W] float in [-1, 1]; a NumPy array (or any object with
            `.shape` and NumPy basic slicing `x[:, t0:t1, :, h0:h1, w0:w1]`, such as a lazy
            uint8 view) is read and moved to the device one tile at a time. T = 1 + 8k frames gives 1 + 2k latent frames (CogVideoX).
          tile_batches: frame batches per jitted call (8 frames each, the first also takes
            the T % 8 remainder); None = the whole video in one call. The result does not
            depend on it; memory grows with it.
          spatial_tiling: diffusers' `enable_tiling()` behaviour (changes the result, as
            in diffusers); None = off.
        Returns:
          (mean, logvar), each [B, T', latent_channels, H / 8, W / 8] float32; logvar is
          clamped to [-30, 20] as in diffusers' `DiagonalGaussianDistribution`.
        """
        self._check_input(video, self.config.in_channels, "encode", "video")
        moments = jnp.concatenate(list(self._stream(
            _encode_tile_jit, video, self.config.sample_frames_per_batch, tile_batches,
            _spatial_plan(self.config, video.shape[-2:], spatial_tiling, encode=True))), axis=1)
        mean, logvar = jnp.split(moments, 2, axis=2)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: Any, *, tile_batches: int | None = 2,
               spatial_tiling: SpatialTiling | None = None) -> jax.Array:
        """Decodes raw (unscaled) latents [B, T', latent_channels, h, w] to video
        [B, T, C, 8h, 8w] float32 (about [-1, 1]); 13 latent frames give 49 frames.

        `tile_batches`: latent frame batches (2 frames each, the first also takes T' % 2) per
        jitted call, None = one call; the result does not depend on it. To stream a long
        video to disk without holding it all, iterate `decode_chunks` instead.
        """
        return jnp.concatenate(list(self.decode_chunks(
            latents, tile_batches=tile_batches, spatial_tiling=spatial_tiling)), axis=1)

    def decode_chunks(self, latents: Any, *, tile_batches: int | None = 2,
                      spatial_tiling: SpatialTiling | None = None) -> Iterator[jax.Array]:
        """Like `decode`, yielding the video one temporal tile at a time ([B, t, C, H, W])."""
        self._check_input(latents, self.config.latent_channels, "decode", "latents")
        yield from self._stream(
            _decode_tile_jit, latents, self.config.latent_frames_per_batch, tile_batches,
            _spatial_plan(self.config, latents.shape[-2:], spatial_tiling, encode=False))

    def _stream(self, tile_fn, x, per_batch, tile_batches, plan) -> Iterator[jax.Array]:
        """Runs `tile_fn` over temporal tiles (outer) and spatial tiles (inner), each spatial
        tile carrying its own conv cache, and yields the blended output of every temporal tile."""
        if tile_batches is not None and (not isinstance(tile_batches, int) or tile_batches < 1):
            raise ValueError(f"tile_batches must be a positive int or None, got {tile_batches!r}")
        graphdef, state = nnx.split(self)
        segs = frame_batches(x.shape[1], per_batch)
        step = len(segs) if tile_batches is None else tile_batches
        caches: dict[tuple[int, int], Cache | None] = {}
        start = 0
        for k in range(0, len(segs), step):
            tile_segs = segs[k:k + step]
            stop = start + sum(tile_segs)
            rows = []
            for i, row_slices in enumerate(plan.slices):
                row = []
                for j, (hs, ws) in enumerate(row_slices):
                    piece = jnp.asarray(x[:, start:stop, :, hs, ws])
                    out, caches[i, j] = tile_fn(graphdef, state, piece, tile_segs,
                                                caches.get((i, j)))
                    row.append(out)
                rows.append(row)
            yield plan.blend(rows)
            start = stop

    @staticmethod
    def _check_input(x: Any, channels: int, fn: str, name: str) -> None:
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 5:
            raise ValueError(f"{fn}: {name} must be [B, T, C, H, W], got shape {shape}")
        if shape[2] != channels:
            raise ValueError(f"{fn}: {name} has {shape[2]} channels on axis 2 but the VAE expects "
                             f"{channels}; pass [B, T, C, H, W] (transpose diffusers' [B, C, T, H, W])")
        if min(shape) < 1:
            raise ValueError(f"{fn}: {name} has an empty axis, shape {shape}")


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I); shapes as `mean`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_tile_jit(graphdef, state, x, segs, cache):
    """[B, T, C, H, W] frames -> ([B, T', 2 * latent, h, w] moments, cache)."""
    vae = nnx.merge(graphdef, state)
    moments, cache = vae.encode_tile(jnp.moveaxis(x.astype(jnp.float32), 2, -1), segs, cache)
    return jnp.moveaxis(moments, -1, 2).astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_tile_jit(graphdef, state, z, segs, cache):
    """[B, T', latent, h, w] latents -> ([B, T, C, H, W] video, cache)."""
    vae = nnx.merge(graphdef, state)
    video, cache = vae.decode_tile(jnp.moveaxis(z.astype(jnp.float32), 2, -1), segs, cache)
    return jnp.moveaxis(video, -1, 2).astype(jnp.float32), cache


# ----------------------------------------------------------------------------- spatial tiles


@dataclasses.dataclass(frozen=True)
class _SpatialPlan:
    """Input slices of the spatial tiles (rows of columns) and how outputs are blended."""

    slices: tuple[tuple[tuple[slice, slice], ...], ...]
    blend_extent: tuple[int, int] = (0, 0)
    row_limit: tuple[int, int] | None = None

    def blend(self, rows: list[list[jax.Array]]) -> jax.Array:
        """Diffusers' blending of [..., h, w] tiles. Blended tiles replace the originals
        before their neighbours use them, as diffusers' in-place blending does."""
        if self.row_limit is None:
            return rows[0][0]
        ext_h, ext_w = self.blend_extent
        lim_h, lim_w = self.row_limit
        out_rows = []
        for i, row in enumerate(rows):
            out_row = []
            for j in range(len(row)):
                tile = row[j]
                if i > 0:
                    tile = _blend_axis(rows[i - 1][j], tile, ext_h, axis=-2)
                if j > 0:
                    tile = _blend_axis(row[j - 1], tile, ext_w, axis=-1)
                row[j] = tile
                out_row.append(tile[..., :lim_h, :lim_w])
            out_rows.append(jnp.concatenate(out_row, axis=-1))
        return jnp.concatenate(out_rows, axis=-2)


def _blend_axis(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Linear cross-fade of a's last `extent` rows into b's first along `axis` (-2 or -1)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    ramp = np.arange(extent) / extent  # float64 like diffusers' Python scalars
    shape = (extent, 1) if axis == -2 else (extent,)
    w_b = jnp.asarray(ramp.astype(np.float32).reshape(shape))
    w_a = jnp.asarray((1 - ramp).astype(np.float32).reshape(shape))
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=a.ndim + axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=b.ndim + axis)
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=b.ndim + axis)
    return jnp.concatenate([tail * w_a + head * w_b, rest], axis=axis)


def _spatial_plan(cfg: VAEConfig, hw: Sequence[int], tiling: SpatialTiling | None,
                  encode: bool) -> _SpatialPlan:
    height, width = int(hw[0]), int(hw[1])
    whole = _SpatialPlan(slices=(((slice(None), slice(None)),),))
    if tiling is None:
        return whole
    s = cfg.spatial_compression
    sample_h = tiling.tile_sample_min_height or cfg.sample_height // 2
    sample_w = tiling.tile_sample_min_width or cfg.sample_width // 2
    latent_h, latent_w = int(sample_h / s), int(sample_w / s)
    f_h, f_w = tiling.tile_overlap_factor_height, tiling.tile_overlap_factor_width
    if encode:
        in_h, in_w, out_h, out_w = sample_h, sample_w, latent_h, latent_w
    else:
        in_h, in_w, out_h, out_w = latent_h, latent_w, sample_h, sample_w
    if width <= in_w and height <= in_h:
        return whole
    step_h, step_w = int(in_h * (1 - f_h)), int(in_w * (1 - f_w))
    if min(step_h, step_w, out_h, out_w) < 1:
        raise ValueError(f"spatial_tiling: tiles {sample_h}x{sample_w} with overlaps {f_h}, {f_w} "
                         "leave no stride; use larger tiles or smaller overlap factors")
    ext_h, ext_w = int(out_h * f_h), int(out_w * f_w)
    slices = tuple(
        tuple((slice(i, i + in_h), slice(j, j + in_w)) for j in range(0, width, step_w))
        for i in range(0, height, step_h))
    return _SpatialPlan(slices=slices, blend_extent=(ext_h, ext_w),
                        row_limit=(out_h - ext_h, out_w - ext_w))
