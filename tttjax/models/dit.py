"""The CogVideoX video Diffusion Transformer in Flax NNX, with the paper's mixer slot.

Base model (docs/design.md §3, diffusers' `CogVideoXTransformer3DModel`, CogVideoX 1.0):

    video tokens = Conv2d(p, stride p) per latent frame      [B, T*h*w, D]  (t, h, w order)
    text tokens  = Linear(text_embed_dim, D)                  [B, n*S, D]
    temb         = Linear(SiLU(Linear(sinusoid(t))))         [B, time_embed_dim]
    per block ("expert adaLN": text and video share every weight except their modulation):
        shift, scale, gate, text_shift, text_scale, text_gate = Linear(SiLU(temb))
        x = LN(h) * (1 + scale) + shift                  (text chunks for text tokens)
        h = h + gate * Attention(x)    joint over [text; video], LN on q/k, 3D RoPE on video
        x = LN(h) * (1 + scale') + shift'
        h = h + gate' * MLP_gelu_tanh(x)
    out = Linear(LN(LN_final(video)) * (1 + scale) + shift), un-patchified to [B, T, C, H, W]

With `mixer != "none"` every block adds the gated bidirectional mixer after attention
(docs/design.md §2, `tttjax.models.video_layout` for the token order):

    X' = Attention(X)                       local 3 s windows when attention == "segment"
    Z' = GatedBidirectional(mixer)(interleave(X'))     per-token text/video gates
    h  = h + gate * deinterleave(Z')

RoPE: attention uses the pipeline's 3D grid (global, `attention="full"`) or, per window,
temporal positions `0..window-1` (local, `attention="segment"`, as in pre-training); the
mixer gets global 3D RoPE with temporal positions `0..T-1` on video tokens, none on text.
The mixer computes its per-token inputs (TTT's learning rate eta) from the interleaved
sequence, so every token's eta comes from that token. (The public ttt-video-dit code computes
eta before interleaving and interleaves the per-mini-batch eta rows, so text tokens of later
segments get the eta of whichever tokens sat at their position before interleaving.)

Sequence length: the interleaved sequence is rarely a multiple of TTT's mini-batch (3 s:
226 + 13 * 1350 = 17776 tokens, b = 64). The mixer pads it at the end and slices the padding
off (TTT gives padded tokens a zero step size, so they never change the inner state); the
reversed pass is padded after its own last token, so in both directions real tokens only
ever follow real tokens. The DiT itself adds no padding.

Scene boundaries are part of the prompts (the storyboard's scene markers are encoded into
each segment's text, as in the public code); the network needs no extra flag.

Blocks are created with `nnx.vmap` and applied with `nnx.scan` (parameters stacked on a
leading `layers` axis), so compile time does not grow with depth; `remat_policy` picks what
each block saves for the backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tttjax.layers.bidirectional import GatedBidirectional
from tttjax.layers.registry import make_mixer
from tttjax.layers.ttt import init_param as _param
from tttjax.models import dit_config
from tttjax.models.embeddings import (pipeline_rope_positions, rope_3d_at, sincos_3d_positions,
                                      timestep_embedding)
from tttjax.models.video_layout import VideoLayout
from tttjax.ops.attention import full_attention, segment_attention
from tttjax.ops.rope import apply_rope, flip_rope, rope_3d
from tttjax.sharding import BHLD, BLD, with_logical_constraint

Tables = dict[str, Any]

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keeps the outputs of attention and of the mixer, recomputes everything else: the
    # backward pass then never re-runs the expensive sequence mixing of a block.
    "save_block_outputs": jax.checkpoint_policies.save_only_these_names(
        "attention_out", "mixer_out"),
}


# ------------------------------------------------------------------------------ helpers


def _layer_norm(x: jax.Array, scale: nnx.Param | None, bias: nnx.Param | None, eps: float
                ) -> jax.Array:
    """LayerNorm over the last axis in float32 (biased variance, torch semantics)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale[...].astype(jnp.float32) + bias[...].astype(jnp.float32)
    return y


def _gelu(x, kind: str):
    return jax.nn.gelu(x, approximate=kind == "gelu-approximate")


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, float32 inside; output float32."""

    def __init__(self, width: int, eps: float, *, affine: bool = True, names=("norm",),
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, "ones", (width,), names, param_dtype) if affine else None
        self.bias = _param(rngs, "zeros", (width,), names, param_dtype) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return _layer_norm(x, self.scale, self.bias, self.eps)


class Dense(nnx.Module):
    """`y = x @ kernel + bias` with a kernel of any rank (`in_dims` leading input axes)."""

    def __init__(self, shape, names, *, bias: bool = True, in_dims: int = 1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_dims, self.dtype = in_dims, dtype
        self.kernel = _param(rngs, "normal", tuple(shape), tuple(names), param_dtype)
        self.bias = (_param(rngs, "zeros", tuple(shape[in_dims:]), tuple(names[in_dims:]), param_dtype)
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        n = self.in_dims
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())),
                                preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Modulation(nnx.Module):
    """adaLN modulation `Linear(SiLU(temb))` split into `chunks` vectors of width D.

    The chunks are their own parameter axis ([time_embed_dim, chunks, D]) so every chunk is
    sharded like any other width-D vector. Output float32 [B, chunks, D].
    """

    def __init__(self, cond_dim: int, chunks: int, width: int, *, param_dtype, rngs: nnx.Rngs):
        self.linear = Dense((cond_dim, chunks, width), (None, None, "embed"),
                            dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, temb: jax.Array) -> jax.Array:
        out = self.linear(jax.nn.silu(temb.astype(jnp.float32)))
        # Sharded like the activations it modulates. Unconstrained, the partitioner shards
        # the output's batch over `data` only (D over fsdp, like the kernel) and reshards
        # temb [B, E] across `data` to get there: on a multi-slice mesh an all-gather and
        # collective-permutes between slices at every modulation (tests/test_bench_aot.py).
        return with_logical_constraint(out, ("activation_batch", None, "activation_embed"))


def _modulate(x32: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x * (1 + scale) + shift with per-example vectors [B, D] broadcast over tokens."""
    return (x32 * (1.0 + scale[:, None, :]) + shift[:, None, :]).astype(dtype)


# ------------------------------------------------------------------------------ attention


class JointAttention(nnx.Module):
    """CogVideoX attention: shared q/k/v/o for text and video, per-head LayerNorm on q and k."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = cfg.num_attention_heads, cfg.attention_head_dim
        width = h * d
        self.cfg, self.num_heads, self.head_dim, self.dtype = cfg, h, d, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_names = ("embed", "heads", "kv")
        self.to_q = Dense((width, h, d), qkv_names, bias=cfg.attention_bias, **kw)
        self.to_k = Dense((width, h, d), qkv_names, bias=cfg.attention_bias, **kw)
        self.to_v = Dense((width, h, d), qkv_names, bias=cfg.attention_bias, **kw)
        self.to_out = Dense((h, d, width), ("heads", "kv", "embed"), in_dims=2, **kw)
        if cfg.qk_norm:
            self.norm_q = LayerNorm(d, cfg.qk_norm_eps, names=("kv",), param_dtype=param_dtype, rngs=rngs)
            self.norm_k = LayerNorm(d, cfg.qk_norm_eps, names=("kv",), param_dtype=param_dtype, rngs=rngs)
        else:
            self.norm_q = self.norm_k = None

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, L, D] -> q, k, v [B, H, L, d] (q, k normalised)."""
        def heads(y):
            y = jnp.swapaxes(y, 1, 2)
            return with_logical_constraint(y, BHLD)

        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q).astype(self.dtype), self.norm_k(k).astype(self.dtype)
        return heads(q), heads(k), heads(v)

    def _output(self, y: jax.Array) -> jax.Array:
        """y [B, H, L, d] -> o-projection [B, L, D]."""
        out = self.to_out(jnp.swapaxes(y, 1, 2))
        return with_logical_constraint(out, BLD)

    def __call__(self, text: jax.Array, video: jax.Array, layout: VideoLayout, tables: Tables
                 ) -> tuple[jax.Array, jax.Array]:
        """text [B, n*S, D], video [B, T*h*w, D] -> attention outputs of the same shapes."""
        tq, tk, tv = self._project(text)
        vq, vk, vv = self._project(video)
        if self.cfg.attention == "segment":
            return self._segment(tq, tk, tv, vq, vk, vv, layout, tables.get("attn_rope"))
        if tables.get("attn_rope") is not None:
            cos, sin = tables["attn_rope"]
            vq, vk = apply_rope(vq, cos, sin), apply_rope(vk, cos, sin)
        q = jnp.concatenate([tq, vq], axis=2)
        k = jnp.concatenate([tk, vk], axis=2)
        v = jnp.concatenate([tv, vv], axis=2)
        y = full_attention(q, k, v, impl=self.cfg.attention_impl, chunk=self.cfg.attention_chunk)
        out = self._output(y)
        split = text.shape[1]
        return out[:, :split], out[:, split:]

    def _segment(self, tq, tk, tv, vq, vk, vv, layout: VideoLayout, rope):
        bsz, h, _, d = tq.shape
        n, s = layout.num_segments, layout.text_len

        def per_segment(t):
            return t.reshape(bsz, h, n, s, d)

        text_y, video_y = segment_attention(
            per_segment(tq), per_segment(tk), per_segment(tv), vq, vk, vv,
            frame_tokens=layout.tokens_per_frame, frames_per_window=layout.window_frames,
            overlap_frames=layout.prefix_frames, video_rope=rope,
            impl=self.cfg.attention_impl, chunk=self.cfg.attention_chunk)
        return self._output(text_y.reshape(bsz, h, n * s, d)), self._output(video_y)


# ------------------------------------------------------------------------------ block


class FeedForward(nnx.Module):
    """Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)."""

    def __init__(self, width: int, activation: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.proj_in = Dense((width, 4 * width), ("embed", "mlp"), **kw)
        self.proj_out = Dense((4 * width, width), ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _gelu(self.proj_in(x), self.activation)
        y = with_logical_constraint(y, ("activation_batch", "activation_length", "activation_mlp"))
        return self.proj_out(y)


def _make_mixer(cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    mixer_cfg = ml_collections.ConfigDict(dict(
        width=cfg.num_attention_heads * cfg.attention_head_dim,
        num_heads=cfg.num_attention_heads, dtype=dtype, param_dtype=param_dtype))
    mixer_cfg.update(cfg.mixer_config.to_dict())  # FrozenConfigDict -> plain dict
    mixer = make_mixer(cfg.mixer, mixer_cfg, rngs=rngs)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return GatedBidirectional(mixer, width, num_modalities=2, gate_init=cfg.gate_init,
                              param_dtype=param_dtype)


class DiTBlock(nnx.Module):
    """One CogVideoX block, with the gated bidirectional mixer after attention if configured."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        width = cfg.num_attention_heads * cfg.attention_head_dim
        self.dtype = dtype
        ln = dict(affine=cfg.norm_elementwise_affine, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(width, cfg.norm_eps, **ln)
        self.modulation1 = Modulation(cfg.time_embed_dim, 6, width, param_dtype=param_dtype, rngs=rngs)
        self.attn = JointAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mixer = (None if cfg.mixer == "none"
                      else _make_mixer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.norm2 = LayerNorm(width, cfg.norm_eps, **ln)
        self.modulation2 = Modulation(cfg.time_embed_dim, 6, width, param_dtype=param_dtype, rngs=rngs)
        self.ff = FeedForward(width, cfg.activation_fn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, text: jax.Array, video: jax.Array, temb: jax.Array, layout: VideoLayout,
                 tables: Tables) -> tuple[jax.Array, jax.Array]:
        """text [B, n*S, D], video [B, T*h*w, D], temb [B, E] -> updated (text, video)."""
        dt = self.dtype
        mod = self.modulation1(temb)
        xt = _modulate(self.norm1(text), mod[:, 3], mod[:, 4], dt)
        xv = _modulate(self.norm1(video), mod[:, 0], mod[:, 1], dt)
        at, av = self.attn(xt, xv, layout, tables)
        at, av = checkpoint_name(at, "attention_out"), checkpoint_name(av, "attention_out")
        if self.mixer is not None:
            bsz, _, d = at.shape
            # Per-segment text is small: keep it whole on each device, so that slicing it
            # out of (or into) a length-sharded sequence needs no resharding of odd tiles.
            per_segment = ("activation_batch", None, None, "activation_embed")
            at = with_logical_constraint(
                at.reshape(bsz, layout.num_segments, layout.text_len, d), per_segment)
            seq = layout.interleave(at, av)
            seq = with_logical_constraint(seq, BLD)
            seq = self.mixer(seq, modality=jnp.asarray(layout.modality),
                             reverse_index=layout.reverse_index,
                             rope=tables.get("mixer_rope"),
                             rope_reversed=tables.get("mixer_rope_reversed"))
            seq = checkpoint_name(seq, "mixer_out")
            at, av = layout.deinterleave(seq)
            at = with_logical_constraint(at, per_segment).reshape(bsz, layout.total_text_len, d)
        text = (text + mod[:, 5][:, None] * at.astype(jnp.float32)).astype(text.dtype)
        video = (video + mod[:, 2][:, None] * av.astype(jnp.float32)).astype(video.dtype)

        mod = self.modulation2(temb)
        xt = _modulate(self.norm2(text), mod[:, 3], mod[:, 4], dt)
        xv = _modulate(self.norm2(video), mod[:, 0], mod[:, 1], dt)
        # MLP on text and video separately: same weights, no concatenated copy of the sequence.
        ft, fv = self.ff(xt), self.ff(xv)
        text = (text + mod[:, 5][:, None] * ft.astype(jnp.float32)).astype(text.dtype)
        video = (video + mod[:, 2][:, None] * fv.astype(jnp.float32)).astype(video.dtype)
        text = with_logical_constraint(text, BLD)
        video = with_logical_constraint(video, BLD)
        return text, video


# ------------------------------------------------------------------------------ model


class CogVideoXDiT(nnx.Module):
    """CogVideoX transformer; `__call__` takes and returns diffusers' `[B, T, C, H, W]` layout."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        # Frozen (hashable) so the config can live in the graph definition as static data.
        cfg = ml_collections.FrozenConfigDict(dit_config.validate(ml_collections.ConfigDict(
            cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))))
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.dtype = dtype
        width = cfg.num_attention_heads * cfg.attention_head_dim
        p, c = cfg.patch_size, cfg.in_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Conv2d(kernel p, stride p) per frame == Linear over (C, p, p) patches.
        self.patch_proj = Dense((c * p * p, width), ("conv", "embed"), **kw)
        self.text_proj = Dense((cfg.text_embed_dim, width), (None, "embed"), **kw)
        self.time_linear_1 = Dense((width, cfg.time_embed_dim), ("embed", None),
                                   dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.time_linear_2 = Dense((cfg.time_embed_dim, cfg.time_embed_dim), (None, None),
                                   dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return DiTBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        ln = dict(affine=cfg.norm_elementwise_affine, param_dtype=param_dtype, rngs=rngs)
        self.norm_final = LayerNorm(width, cfg.norm_eps, **ln)
        self.norm_out = LayerNorm(width, cfg.norm_eps, **ln)
        self.norm_out_modulation = Modulation(cfg.time_embed_dim, 2, width,
                                              param_dtype=param_dtype, rngs=rngs)
        self.proj_out = Dense((width, p * p * cfg.out_channels), ("embed", None), **kw)

    # -- geometry -------------------------------------------------------------------------

    def layout(self, latents_shape, text_shape) -> VideoLayout:
        """Validates input shapes and returns the static `VideoLayout`."""
        cfg = self.cfg
        if len(latents_shape) != 5:
            raise ValueError(f"latents must be [B, T, C, H, W], got shape {tuple(latents_shape)}")
        bsz, t, c, hh, ww = latents_shape
        p = cfg.patch_size
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels, the model expects {cfg.in_channels}")
        if hh % p or ww % p:
            raise ValueError(f"latent height/width {hh}x{ww} must be multiples of patch_size {p}")
        if (len(text_shape) not in (3, 4) or text_shape[0] != bsz
                or text_shape[-1] != cfg.text_embed_dim):
            raise ValueError(
                f"text embeddings must be [B, S, {cfg.text_embed_dim}] or [B, n_segments, S, "
                f"{cfg.text_embed_dim}] with B = {bsz}, got shape {tuple(text_shape)}")
        n = text_shape[1] if len(text_shape) == 4 else 1
        s = text_shape[-2]
        layout = VideoLayout(num_frames=t, grid_h=hh // p, grid_w=ww // p, num_segments=n,
                             text_len=s, frames_per_segment=cfg.frames_per_segment,
                             prefix_frames=cfg.prefix_frames)
        if cfg.attention == "segment":
            layout.check_windows()
        return layout

    def _tables(self, layout: VideoLayout) -> Tables:
        cfg, tables = self.cfg, {}
        d = cfg.attention_head_dim
        if cfg.positional_embedding == "rope":
            if cfg.attention == "segment":
                grid = (layout.window_frames, layout.grid_h, layout.grid_w)
            else:
                grid = (layout.num_frames, layout.grid_h, layout.grid_w)
            rows, cols = pipeline_rope_positions(layout.grid_h, layout.grid_w,
                                                 cfg.sample_height // cfg.patch_size,
                                                 cfg.sample_width // cfg.patch_size)
            tables["attn_rope"] = rope_3d_at(np.arange(grid[0], dtype=np.float32), rows, cols, d,
                                             cfg.rope_theta)
        if cfg.mixer != "none":
            cos, sin = rope_3d((layout.num_frames, layout.grid_h, layout.grid_w), d,
                               theta=cfg.rope_theta)
            tables["mixer_rope"] = layout.interleave_rope(cos, sin)
            if cfg.reverse_rope == "position":
                # video token (t, h, w) rotated as (T-1-t, H-1-h, W-1-w), its slot after the flip
                tables["mixer_rope_reversed"] = layout.interleave_rope(*flip_rope((cos, sin)))
        return tables

    # -- forward --------------------------------------------------------------------------

    def embed(self, latents: jax.Array, text_emb: jax.Array, layout: VideoLayout
              ) -> tuple[jax.Array, jax.Array]:
        """Patch + text embeddings: (text [B, n*S, D], video [B, T*h*w, D]) in `dtype`."""
        cfg = self.cfg
        bsz, t, c, hh, ww = latents.shape
        p = cfg.patch_size
        patches = latents.reshape(bsz, t, c, hh // p, p, ww // p, p)
        patches = patches.transpose(0, 1, 3, 5, 2, 4, 6).reshape(bsz, layout.video_len, c * p * p)
        video = self.patch_proj(patches)
        if cfg.positional_embedding == "sincos":
            pos = sincos_3d_positions(video.shape[-1], t, layout.grid_h, layout.grid_w,
                                      spatial_interpolation_scale=cfg.spatial_interpolation_scale,
                                      temporal_interpolation_scale=cfg.temporal_interpolation_scale)
            video = (video.astype(jnp.float32) + pos[None]).astype(self.dtype)
        text = self.text_proj(text_emb.reshape(bsz, layout.total_text_len, text_emb.shape[-1]))
        return (with_logical_constraint(text, BLD),
                with_logical_constraint(video, BLD))

    def time_embedding(self, timesteps: jax.Array) -> jax.Array:
        """timesteps [B] -> temb [B, time_embed_dim] float32."""
        cfg = self.cfg
        width = cfg.num_attention_heads * cfg.attention_head_dim
        t = timestep_embedding(timesteps, width, flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift)
        return self.time_linear_2(jax.nn.silu(self.time_linear_1(t)))

    def run_blocks(self, text: jax.Array, video: jax.Array, temb: jax.Array,
                   layout: VideoLayout) -> tuple[jax.Array, jax.Array]:
        """All blocks via `nnx.scan` over the stacked parameters."""
        tables = self._tables(layout)

        def body(block, carry, temb, tables):
            return block(carry[0], carry[1], temb, layout, tables)

        policy = self.cfg.remat_policy
        if policy != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry,
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        return scan(self.blocks, (text, video), temb, tables)

    def head(self, video: jax.Array, temb: jax.Array, layout: VideoLayout) -> jax.Array:
        """Final norms, AdaLN, projection and un-patchify: [B, T*h*w, D] -> [B, T, C, H, W]."""
        cfg = self.cfg
        mod = self.norm_out_modulation(temb)          # chunk order: shift, scale
        x = self.norm_out(self.norm_final(video))
        x = _modulate(x, mod[:, 0], mod[:, 1], self.dtype)
        y = self.proj_out(x)                           # [B, T*h*w, C*p*p], (C, p, p) order
        bsz, p, co = y.shape[0], cfg.patch_size, cfg.out_channels
        y = y.reshape(bsz, layout.num_frames, layout.grid_h, layout.grid_w, co, p, p)
        y = y.transpose(0, 1, 4, 2, 5, 3, 6)
        return y.reshape(bsz, layout.num_frames, co, layout.grid_h * p, layout.grid_w * p)

    def __call__(self, latents: jax.Array, text_emb: jax.Array, timesteps: jax.Array
                 ) -> jax.Array:
        """Velocity (v-prediction) for noisy latents.

        Args:
          latents: [B, T, C, H, W] noisy VAE latents (diffusers layout).
          text_emb: [B, S, Dt] one prompt, or [B, n, S, Dt] one prompt per 3-second segment
            (the paper's storyboard; scene-transition markers are part of each prompt's text).
          timesteps: [B] integer (or float) diffusion timesteps.
        Returns:
          [B, T, C_out, H, W] in the model dtype.
        """
        layout = self.layout(latents.shape, text_emb.shape)
        if timesteps.shape != (latents.shape[0],):
            raise ValueError(f"timesteps must be [B] = [{latents.shape[0]}], got {timesteps.shape}")
        temb = self.time_embedding(timesteps)
        text, video = self.embed(latents, text_emb, layout)
        text, video = self.run_blocks(text, video, temb, layout)
        return self.head(video, temb, layout)


def count_params(state: Any) -> int:
    """Number of scalars in an (abstract or concrete) nnx state."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
