"""`config.model` of the video DiT: CogVideoX-5B defaults, validation, diffusers mapping.

The architecture fields carry diffusers' `CogVideoXTransformer3DModel` names where one exists
(`num_layers`, `norm_eps`, `flip_sin_to_cos`, ...), so a diffusers `config.json` maps onto
them one to one. The integration fields (docs/design.md §2) and the execution fields (dtypes,
remat, attention kernel) are tttjax's own.

Stage geometry (docs/design.md §3): 480 x 720 video, 16 fps, 4x temporal compression; a 3 s
segment is 12 latent frames and the video starts with one extra latent frame, so a stage of
`n` segments has `12 n + 1` latent frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from tttjax.ops import attention as attention_ops

# stage name -> number of 3-second segments
STAGE_SEGMENTS = {"3s": 1, "9s": 3, "18s": 6, "30s": 10, "63s": 21}
FRAMES_PER_SEGMENT = 12   # latent frames per 3-second segment
PREFIX_FRAMES = 1         # the extra first latent frame; also each window's overlap

ATTENTION_MODES = ("full", "segment")
REVERSE_ROPE = ("token", "position")
ATTENTION_IMPLS = attention_ops.IMPLS    # the attention ops' `impl` values, docs/design.md §9
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_block_outputs")
POSITIONAL_EMBEDDINGS = ("rope", "sincos")
ACTIVATIONS = ("gelu-approximate", "gelu")
DTYPES = ("float32", "bfloat16", "float16")


def num_latent_frames(num_segments: int, frames_per_segment: int = FRAMES_PER_SEGMENT,
                      prefix_frames: int = PREFIX_FRAMES) -> int:
    """Latent frames of an n-segment video: `prefix + n * frames_per_segment` (12n + 1 for
    CogVideoX). The one place this count is computed (docs/design.md §2)."""
    if num_segments < 1:
        raise ValueError(f"need at least one segment, got {num_segments}")
    return frames_per_segment * num_segments + prefix_frames


def latent_frames(model: Mapping[str, Any], num_segments: int) -> int:
    """`num_latent_frames` for the segment geometry of a `config.model`."""
    return num_latent_frames(num_segments, model["frames_per_segment"], model["prefix_frames"])


def stage_latent_frames(stage: str) -> int:
    """Latent frames of a stage: `12 * segments + 1` (13, 37, 73, 121, 253)."""
    if stage not in STAGE_SEGMENTS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_SEGMENTS)}")
    return num_latent_frames(STAGE_SEGMENTS[stage])


def cogvideox_5b() -> ml_collections.ConfigDict:
    """`config.model` for CogVideoX-5B (diffusers' THUDM/CogVideoX-5b transformer), mixer none."""
    return ml_collections.ConfigDict(dict(
        # --- base architecture (diffusers names) ---
        num_layers=42,
        num_attention_heads=48,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        patch_size=2,
        text_embed_dim=4096,
        time_embed_dim=512,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_eps=1e-5,
        qk_norm=True,
        qk_norm_eps=1e-6,
        norm_elementwise_affine=True,
        attention_bias=True,
        activation_fn="gelu-approximate",
        timestep_activation_fn="silu",
        positional_embedding="rope",        # "rope" (5B) or "sincos" (2B)
        rope_theta=10000.0,
        sample_height=60,                   # latent size the RoPE grid is fitted to
        sample_width=90,
        spatial_interpolation_scale=1.875,  # sin-cos positions only
        temporal_interpolation_scale=1.0,
        # --- the paper's integration (docs/design.md §2) ---
        mixer="none",                       # "none" or a name from tttjax.layers.registry
        # make_mixer options: flat, and/or per mixer under its name ({ttt_mlp: {...}, ...});
        # only the sub-dict named like `mixer` is read, so settings follow the mixer.
        mixer_config=ml_collections.ConfigDict(),
        attention="full",                   # "full": joint over all tokens; "segment": 3 s windows
        frames_per_segment=FRAMES_PER_SEGMENT,
        prefix_frames=PREFIX_FRAMES,
        gate_init=0.1,
        # RoPE of the mixer's reversed pass (docs/design.md §2, §8): "token" rotates each token
        # by its own position; "position" by its slot after the flip (the seed code's choice).
        reverse_rope="token",
        # --- execution ---
        dtype="float32",                    # activation / matmul dtype
        param_dtype="float32",
        remat_policy="none",                # per block, see REMAT_POLICIES
        attention_impl="xla",               # "xla", "cudnn" (GPU flash), "chunked" (online softmax),
                                            # "auto" (cudnn on GPU, chunked elsewhere)
        attention_chunk=1024,               # query/key block of attention_impl "chunked"
    ))


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks `config.model` once at start-up; raises ValueError naming the field and the fix."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"config.model: {msg}")

    for name in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                 "out_channels", "patch_size", "text_embed_dim", "time_embed_dim",
                 "frames_per_segment", "attention_chunk"):
        need(isinstance(cfg[name], int) and cfg[name] >= 1, f"{name} must be a positive int, got {cfg[name]!r}")
    need(isinstance(cfg.prefix_frames, int) and cfg.prefix_frames >= 0,
         f"prefix_frames must be an int >= 0, got {cfg.prefix_frames!r}")
    need(cfg.positional_embedding in POSITIONAL_EMBEDDINGS,
         f"positional_embedding {cfg.positional_embedding!r} not in {POSITIONAL_EMBEDDINGS}")
    need(cfg.activation_fn in ACTIVATIONS, f"activation_fn {cfg.activation_fn!r} not in {ACTIVATIONS}")
    need(cfg.timestep_activation_fn == "silu",
         f"timestep_activation_fn must be 'silu', got {cfg.timestep_activation_fn!r}")
    need(cfg.attention in ATTENTION_MODES, f"attention {cfg.attention!r} not in {ATTENTION_MODES}")
    need(cfg.attention_impl in ATTENTION_IMPLS,
         f"attention_impl {cfg.attention_impl!r} not in {ATTENTION_IMPLS}")
    need(cfg.reverse_rope in REVERSE_ROPE,
         f"reverse_rope {cfg.reverse_rope!r} not in {REVERSE_ROPE} (token: each token by its own "
         "position; position: by its slot after the flip, as the seed code)")
    need(cfg.remat_policy in REMAT_POLICIES, f"remat_policy {cfg.remat_policy!r} not in {REMAT_POLICIES}")
    need(cfg.dtype in DTYPES and cfg.param_dtype in DTYPES,
         f"dtype/param_dtype must be in {DTYPES}, got {cfg.dtype!r}/{cfg.param_dtype!r}")
    need(cfg.norm_eps > 0 and cfg.qk_norm_eps > 0, "norm_eps and qk_norm_eps must be > 0")
    width = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.positional_embedding == "rope":
        need(cfg.attention_head_dim % 8 == 0,
             f"3D RoPE splits the head dim t:h:w = 2:3:3 and needs it divisible by 8, got "
             f"{cfg.attention_head_dim}")
        need(cfg.sample_height >= cfg.patch_size and cfg.sample_width >= cfg.patch_size,
             "sample_height/sample_width must hold at least one patch")
    else:
        need(width % 16 == 0, f"sin-cos positions need a width divisible by 16, got {width}")
    need(cfg.mixer == "none" or cfg.attention_head_dim % 8 == 0,
         "a mixer gets 3D RoPE on video tokens: attention_head_dim must be divisible by 8")
    if cfg.mixer != "none":
        from tttjax.layers import registry  # late: the registry imports every mixer

        names = registry.mixer_names()
        need(cfg.mixer in names, f"mixer {cfg.mixer!r} is not registered; choose one of "
             f"{('none',) + tuple(names)}")
        _check_mixer_settings(cfg)
    return cfg


def _check_mixer_settings(cfg: ml_collections.ConfigDict) -> None:
    """Builds the configured mixer abstractly (no arrays) so that its own checks of
    `config.model.mixer_config` (mini-batch or chunk sizes, windows, unknown options) fail
    at start-up, naming the field, rather than when the model is first built."""
    import jax.numpy as jnp
    from flax import nnx

    from tttjax.models.dit import _make_mixer

    try:
        nnx.eval_shape(lambda: _make_mixer(cfg, dtype=jnp.dtype(cfg.dtype),
                                           param_dtype=jnp.dtype(cfg.param_dtype),
                                           rngs=nnx.Rngs(0)))
    except (ValueError, TypeError) as err:
        raise ValueError(f"config.model.mixer_config.{cfg.mixer}: {err}") from None


def mixer_option(cfg: ml_collections.ConfigDict, option: str):
    """The value of the configured mixer's `option` as `make_mixer` resolves it (a
    top-level `mixer_config` key over the mixer's sub-dict over the mixer's default), or
    None when the mixer has no such option."""
    import inspect

    from tttjax.layers import registry

    if cfg.mixer == "none" or option not in registry.mixer_options(cfg.mixer):
        return None
    mc = cfg.mixer_config
    if option in mc:
        return mc[option]
    sub = mc.get(cfg.mixer)
    if sub is not None and option in sub:
        return sub[option]
    for klass in registry.MIXERS[cfg.mixer].__mro__:
        params = inspect.signature(klass.__init__).parameters
        if option in params and params[option].default is not inspect.Parameter.empty:
            return params[option].default
    return None


def from_diffusers_config(raw: Mapping[str, Any], **overrides) -> ml_collections.ConfigDict:
    """`config.model` from a diffusers `CogVideoXTransformer3DModel` config.json dict.

    `overrides` set tttjax fields (mixer, dtype, remat_policy, ...) on top. Features of
    other CogVideoX variants that the DiT does not implement are refused by name.
    """
    name = raw.get("_class_name", "CogVideoXTransformer3DModel")
    if name != "CogVideoXTransformer3DModel":
        raise ValueError(f"config.json describes a {name}, not a CogVideoXTransformer3DModel; "
                         "point at the transformer folder (e.g. <pipeline>/transformer)")
    unsupported = {
        "patch_size_t": "CogVideoX 1.5 temporal patches",
        "ofs_embed_dim": "the CogVideoX-1.5 I2V ofs embedding",
    }
    for key, what in unsupported.items():
        if raw.get(key):
            raise ValueError(f"config.json sets {key}={raw[key]!r} ({what}); only CogVideoX 1.0 "
                             "text-to-video transformers (2B, 5B) are supported")
    if raw.get("use_learned_positional_embeddings"):
        raise ValueError("config.json uses learned positional embeddings (CogVideoX-5b-I2V); only "
                         "the text-to-video transformers are supported")
    if not raw.get("patch_bias", True):
        raise ValueError("config.json sets patch_bias=False; CogVideoX 1.0 patch embeddings have a bias")
    if raw.get("dropout", 0.0):
        raise ValueError(f"config.json sets dropout={raw['dropout']}; the DiT has no dropout, set it to 0")

    cfg = cogvideox_5b()
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                "text_embed_dim", "time_embed_dim", "flip_sin_to_cos", "norm_eps",
                "norm_elementwise_affine", "attention_bias", "activation_fn",
                "timestep_activation_fn", "sample_height", "sample_width",
                "spatial_interpolation_scale", "temporal_interpolation_scale", "patch_size"):
        if key in raw:
            default = cfg[key]
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            cfg[key] = type(default)(raw[key]) if numeric else raw[key]
    cfg.out_channels = int(raw.get("out_channels") or cfg.in_channels)
    cfg.freq_shift = int(raw.get("freq_shift", 0))
    cfg.positional_embedding = "rope" if raw.get("use_rotary_positional_embeddings", False) else "sincos"
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown config.model field {key!r}; fields: {sorted(cfg.keys())}")
        if key == "mixer_config":
            cfg.mixer_config = ml_collections.ConfigDict(dict(value))
        else:
            cfg[key] = value
    return validate(cfg)


def to_diffusers_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The diffusers `CogVideoXTransformer3DModel` kwargs of the base architecture."""
    return dict(
        num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, patch_size=cfg.patch_size,
        text_embed_dim=cfg.text_embed_dim, time_embed_dim=cfg.time_embed_dim,
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift, norm_eps=cfg.norm_eps,
        norm_elementwise_affine=cfg.norm_elementwise_affine, attention_bias=cfg.attention_bias,
        activation_fn=cfg.activation_fn, timestep_activation_fn=cfg.timestep_activation_fn,
        sample_height=cfg.sample_height, sample_width=cfg.sample_width,
        spatial_interpolation_scale=cfg.spatial_interpolation_scale,
        temporal_interpolation_scale=cfg.temporal_interpolation_scale,
        use_rotary_positional_embeddings=cfg.positional_embedding == "rope",
    )
