"""Analytic matmul FLOPs of the video DiT (model FLOPs, the numerator of MFU).

Counted: every matrix multiply of the forward pass, 2 FLOPs per multiply-add; not counted:
elementwise work (norms, GELU, RoPE, softmax, modulation, residuals), the sampler or loss,
and anything an implementation recomputes (remat, TTT's remat groups). Training is three
forward passes' worth (the backward pass multiplies twice as much: gradients with respect to
activations and to weights), the usual convention for MFU.

Per example, with D = heads * head_dim, N_v = T * (H/p) * (W/p) video tokens, N_t = n * S
text tokens (n segments of S prompt tokens), N = N_t + N_v, E = time_embed_dim:

    embeddings   2 N_v (C p^2) D + 2 N_t D_text D + 2 D E + 2 E^2       (patch, text, time MLP)
    per block    2 E (12 D)                      adaLN modulation (2 x 6 vectors of width D)
                 8 N D^2                         attention q, k, v, o projections
                 4 D sum_w N_w^2                 q k^T and softmax(.) v; one window of all N
                                                 tokens for attention="full", else n windows
                                                 of S + (frames_per_segment + prefix) hw tokens
                 16 N D^2                        MLP D -> 4D -> D
                 mixer, twice (the gated forward and reversed passes), over L tokens:
                   TTT:   6 L D^2 (q, k, v) + 2 N D^2 (o) + 2 L D H (learning-rate gate)
                          + L D c d, c = 56 (TTT-MLP, F = 4d) or 6 (TTT-Linear)
                          per token and head: TTT-MLP's 7 matmuls of 2 d F per mini-batch
                          row (inner forward on k: 2, gradient through W2: 1, updates of W1
                          and W2: 2, forward on q with the updated weights: 2); TTT-Linear's 3
                          matmuls of 2 d^2; L is N rounded up to whole mini-batches (the layer
                          pads, and the padded rows are computed up to the o projection)
                   full:  8 L D^2 + 4 L^2 D          swa: 8 L D^2 + 4 L min(window, L) D
                   gated_deltanet (K = H d_k, V = H d_v): 2 L D (2K + 2V + 2H) + 2 L V D
                          + H n_c (6 C^2 d_k + 4 C^2 d_v + 6 C d_k d_v + inv(C))
                          over n_c = ceil(L / C) chunks of C: K K^T, Q K^T, T^-1 [V | K], the
                          in-chunk output, and the three state matmuls of the chunk recurrence;
                          inv(C) is the recursive block inversion of T (C padded to a power of
                          two s_max: sum over s = 1, 2, .., s_max / 2 of 2 s_max s^2)
                   mamba2 (I = expand D inner width, P head dim, H' = I / P heads, G groups,
                          N state): 2 L D (2I + 2GN + H') + 2 L I D
                          + n_c (G 2 C^2 N + H' (2 C^2 P + 4 C P N))
                          C B^T per group; the in-chunk output, each chunk's state and the
                          read-out of the carried state per head
                   The chunked mixers count what their chunked form multiplies (padding of
                   the last chunk included), as TTT counts its padded mini-batches.
    head         2 E (2 D) + 2 N_v D (C_out p^2)

XLA's `cost_analysis()` counts more (every elementwise op, recomputation under remat) and,
on the compilers here, counts the body of a loop once, not once per iteration: the DiT scans
its blocks, TTT scans mini-batches and segment attention scans windows. Its figure is
therefore comparable only where every loop runs once (one block, one segment, one
mini-batch), which is how the tests check this count. `traced_matmul_flops` counts the
matmuls of the traced program itself (jaxpr `dot_general`s, scan bodies times their length),
so it checks the formula at any size; in training it also holds what remat recomputes.
"""

from __future__ import annotations

import math

import ml_collections

# Forward matmuls per mini-batch row of the non-causal TTT inner loop (see module doc).
TTT_FWD_MATMULS = {"mlp": 7, "linear": 3}
# Rows of the gate tables of tttjax.layers.bidirectional (text, video).
GATE_MODALITIES = 2
# Mixers with an analytic count: every registered mixer, and `none`.
COUNTED_MIXERS = ("none", "ttt_mlp", "ttt_linear", "full", "swa", "gated_deltanet", "mamba2")


def ttt_inner_flops(kind: str, tokens: int, heads: int, head_dim: int) -> int:
    """Forward FLOPs of the TTT inner loop over `tokens` rows (a whole number of mini-batches)."""
    hidden = 4 * head_dim if kind == "mlp" else head_dim
    return TTT_FWD_MATMULS[kind] * 2 * head_dim * hidden * heads * tokens


def unit_lower_inverse_flops(c: int) -> int:
    """Matmul FLOPs of `tttjax.ops.delta_rule.unit_lower_inverse` on one C x C matrix."""
    size, s, total = 1 << max(0, (c - 1).bit_length()), 1, 0
    while s < size:
        total += (size // (2 * s)) * 2 * (2 * s ** 3)   # two s x s x s products per block
        s *= 2
    return total


def delta_rule_flops(tokens: int, heads: int, d_k: int, d_v: int, chunk: int) -> int:
    """Forward FLOPs of `tttjax.ops.delta_rule.gated_delta_rule` (one batch row)."""
    c, n = chunk, -(-tokens // chunk)
    per_chunk = (6 * c * c * d_k + 4 * c * c * d_v + 6 * c * d_k * d_v
                 + unit_lower_inverse_flops(c))
    return heads * n * per_chunk


def ssd_flops(tokens: int, heads: int, groups: int, head_dim: int, d_state: int,
              chunk: int) -> int:
    """Forward FLOPs of `tttjax.ops.ssd.ssd` (one batch row)."""
    c, n = chunk, -(-tokens // chunk)
    return n * (groups * 2 * c * c * d_state
                + heads * (2 * c * c * head_dim + 4 * c * head_dim * d_state))


def _mixer_option(cfg: ml_collections.ConfigDict, name: str, option: str, default):
    """A mixer option as the registry resolves it: top level of mixer_config, then the
    mixer's own sub-dict, then the registry default."""
    mc = cfg.mixer_config
    if option in mc and not isinstance(mc[option], (dict, ml_collections.ConfigDict)):
        return mc[option]
    sub = mc.get(name)
    if sub is not None and option in sub:
        return sub[option]
    return default


def mixer_flops(cfg: ml_collections.ConfigDict, tokens: int) -> int:
    """Forward FLOPs of one block's gated bidirectional mixer over `tokens` tokens."""
    from tttjax.layers import registry

    name = cfg.mixer
    if name == "none":
        return 0
    if name not in COUNTED_MIXERS:
        raise ValueError(f"no analytic FLOP count for mixer {name!r}; counted: {COUNTED_MIXERS}")
    h, d = cfg.num_attention_heads, cfg.attention_head_dim
    width = h * d
    defaults = registry.default_mixer_config(width, h)[name]
    proj = 8 * width * width
    if name in ("ttt_mlp", "ttt_linear"):
        b = _mixer_option(cfg, name, "mini_batch_size", defaults.mini_batch_size)
        padded = -(-tokens // b) * b
        one_pass = (6 * padded * width * width + 2 * tokens * width * width
                    + 2 * padded * width * h + ttt_inner_flops(name[len("ttt_"):], padded, h, d))
    elif name == "full":
        one_pass = proj * tokens + 4 * tokens * tokens * width
    elif name == "gated_deltanet":
        d_k = _mixer_option(cfg, name, "head_dim", None) or width // h
        d_v = int(d_k * _mixer_option(cfg, name, "expand_v", defaults.expand_v))
        chunk = _mixer_option(cfg, name, "chunk_size", defaults.chunk_size)
        key, value = h * d_k, h * d_v
        one_pass = (2 * tokens * width * (2 * key + 2 * value + 2 * h) + 2 * tokens * value * width
                    + delta_rule_flops(tokens, h, d_k, d_v, chunk))
    elif name == "mamba2":
        p = _mixer_option(cfg, name, "head_dim", None) or width // h
        inner = _mixer_option(cfg, name, "expand", defaults.expand) * width
        groups = _mixer_option(cfg, name, "ngroups", defaults.ngroups)
        state = _mixer_option(cfg, name, "d_state", defaults.d_state)
        chunk = _mixer_option(cfg, name, "chunk_size", defaults.chunk_size)
        heads = inner // p
        one_pass = (2 * tokens * width * (2 * inner + 2 * groups * state + heads)
                    + 2 * tokens * inner * width
                    + ssd_flops(tokens, heads, groups, p, state, chunk))
    else:
        window = _mixer_option(cfg, name, "window", defaults.window)
        one_pass = proj * tokens + 4 * tokens * min(window, tokens) * width
    return 2 * one_pass


def gate_flops(cfg: ml_collections.ConfigDict, tokens: int) -> int:
    """Matmul FLOPs of one DiT forward pass (any batch size) spent expanding the gated
    bidirectional wrapper's [2, D] gate tables to per-token rows (a one-hot [L, 2] x [2, D]
    matmul per gate, so that their gradients accumulate in float32; two gates per block). Not
    model FLOPs: a table lookup done as a matmul, once per pass rather than per example.
    `traced_matmul_flops` counts it."""
    if cfg.mixer == "none":
        return 0
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return cfg.num_layers * 2 * (2 * tokens * GATE_MODALITIES * width)


def dit_forward_flops(cfg: ml_collections.ConfigDict, *, latent_frames: int, latent_height: int,
                      latent_width: int, num_segments: int, text_length: int) -> dict[str, int]:
    """Forward matmul FLOPs of one example, by part (see the module doc), and their `total`.

    Args:
      cfg: `config.model`.
      latent_frames, latent_height, latent_width: the latent video [T, C, H, W] of one example.
      num_segments, text_length: prompts n and tokens per prompt S.
    """
    p = cfg.patch_size
    width = cfg.num_attention_heads * cfg.attention_head_dim
    e = cfg.time_embed_dim
    hw = (latent_height // p) * (latent_width // p)
    n_video = latent_frames * hw
    n_text = num_segments * text_length
    n = n_video + n_text
    if cfg.attention == "full":
        windows = [n]
    else:
        windows = [text_length + (cfg.frames_per_segment + cfg.prefix_frames) * hw] * num_segments
    per_block = {
        "modulation": 2 * e * 12 * width,
        "attention_projections": 8 * n * width * width,
        "attention_scores": 4 * width * sum(w * w for w in windows),
        "mlp": 16 * n * width * width,
        "mixer": mixer_flops(cfg, n),
    }
    parts = {
        "embeddings": (2 * n_video * cfg.in_channels * p * p * width + 2 * n_text
                       * cfg.text_embed_dim * width + 2 * width * e + 2 * e * e),
        **{k: cfg.num_layers * v for k, v in per_block.items()},
        "head": 2 * e * 2 * width + 2 * n_video * width * cfg.out_channels * p * p,
    }
    parts["total"] = sum(parts.values())
    return parts


def stage_forward_flops(config: ml_collections.ConfigDict, num_segments: int | None = None
                        ) -> dict[str, int]:
    """`dit_forward_flops` of one example of a run config's stage (optionally with another
    number of segments, latent frames following: prefix + n * frames_per_segment)."""
    m, s = config.model, config.stage
    n = num_segments or s.num_segments
    frames = s.latent_frames if n == s.num_segments else m.prefix_frames + n * m.frames_per_segment
    return dit_forward_flops(m, latent_frames=frames, latent_height=s.latent_height,
                             latent_width=s.latent_width, num_segments=n,
                             text_length=s.text_length)


def train_step_flops(config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one train step, an optimiser update over the global batch: 3 x the
    forward matmuls x config.train.global_batch_size (accumulation does not change it). NaN
    for a mixer without an analytic count (not in COUNTED_MIXERS)."""
    if config.model.mixer not in COUNTED_MIXERS:
        return math.nan
    return 3.0 * config.train.global_batch_size * stage_forward_flops(config)["total"]


def _sub_jaxprs(value):
    """Jaxprs held by an equation parameter (a jaxpr, closed jaxpr, or a tuple of them)."""
    from jax.extend import core

    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every `dot_general` in `jaxpr`: a scan body counts `length` times,
    a `cond` its costliest branch, a `while` body once (its trip count is not static)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
            total += 2 * math.prod(lhs) * math.prod(rhs_free)
            continue
        subs = [(key, j) for key, v in eqn.params.items() for j in _sub_jaxprs(v)]
        if name == "cond":
            total += max((jaxpr_matmul_flops(j) for _, j in subs), default=0)
            continue
        times = eqn.params["length"] if name == "scan" else 1
        total += times * sum(jaxpr_matmul_flops(j) for key, j in subs if key != "cond_jaxpr")
    return total


def traced_matmul_flops(fn, *args) -> int:
    """`jaxpr_matmul_flops` of `fn(*args)` as traced (args may be ShapeDtypeStructs)."""
    import jax

    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
