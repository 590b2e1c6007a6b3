"""Softmax attention in the forms the mixers and the DiT need, layout [B, H, L, d].

- `full_attention`: one call to `jax.nn.dot_product_attention` (logits materialised by the
  XLA implementation, fused on GPU with `impl="cudnn"`), or `chunked_attention` with
  `impl="chunked"`.
- `chunked_attention`: the same numbers with an online softmax over key blocks inside a
  scan over query blocks; memory O(L * chunk), no kernel needed.
- `sliding_window_attention`: token i sees keys i - left .. i + right, computed per query
  block against only the key blocks its window can reach (memory O(L * window), never L x L).
- `local_attention`: non-causal attention inside consecutive windows of a fixed size
  (block-diagonal), the "local attention" baseline cost.
- `segment_attention`: the DiT's 3-second windows: text prompt i plus the video frames of
  window i (windows share `overlap_frames` frames; overlapping outputs are averaged),
  local RoPE inside every window.

Padded and packed batches (`full_attention`, `chunked_attention`, `sliding_window_attention`):
`key_mask` [B, Lk] bool (False: a key no query sees, e.g. padding) and `segment_ids` [B, L]
int (a query sees only keys of its own id: block-diagonal attention over packed sequences).

Backend option `impl` (one set of values for every attention op and layer, docs/design.md
§9 "backend options"): "xla" (`jax.nn.dot_product_attention`'s XLA path, logits
materialised; any platform), "cudnn" (its fused kernel, NVIDIA GPUs), "chunked" (tttjax's own
blocked computation: online softmax over key blocks, or only the key blocks a sliding window
reaches; any platform, never L x L) and "auto" ("cudnn" on GPU, "chunked" elsewhere, decided
by `tttjax.platform` for the program being traced).

Blocked forms scan over blocks with `jax.checkpoint` around each block, so the backward pass
keeps one block's logits at a time. Logits and softmax are float32 whatever the input dtype;
outputs take q's dtype. The scale is d ** -0.5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tttjax import platform

from tttjax.ops.rope import apply_rope

_MASKED = -1e30  # finite, so fully masked (padding) rows stay NaN-free in both passes


def _check_qkv(name, q, k, v, same_length=True):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name}: q, k, v must be [B, H, L, d], got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{name}: q {q.shape}, k {k.shape}, v {v.shape} disagree on B, H, L or d")
    if same_length and k.shape[2] != q.shape[2]:
        raise ValueError(f"{name}: q and k must have the same length, got {q.shape[2]} and {k.shape[2]}")


def _pad_length(a: jax.Array, before: int, after: int) -> jax.Array:
    if before == 0 and after == 0:
        return a
    return jnp.pad(a, ((0, 0), (0, 0), (before, after), (0, 0)))


def _softmax_attend(q, k, v, mask, scale):
    """q [..., Tq, d], k/v [..., Tk, d], mask broadcastable to [..., Tq, Tk] or None."""
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32)


def _check_token_masks(name, q, k, key_mask, segment_ids):
    bsz, _, lq, _ = q.shape
    lk = k.shape[2]
    if key_mask is not None and key_mask.shape != (bsz, lk):
        raise ValueError(f"{name}: key_mask must be [B, Lk] = {(bsz, lk)}, got {key_mask.shape}")
    if segment_ids is not None and (lq != lk or segment_ids.shape != (bsz, lq)):
        raise ValueError(f"{name}: segment_ids must be [B, L] = {(bsz, lq)} (queries and keys of "
                         f"one sequence), got {segment_ids.shape} with Lk = {lk}")


def _token_mask(key_mask, seg_q, seg_k):
    """[B, 1, Tq, Tk] bool (or None) from key_mask [B, Tk] and segment ids [B, Tq] / [B, Tk]."""
    mask = None
    if key_mask is not None:
        mask = key_mask.astype(bool)[:, None, None, :]
    if seg_q is not None:
        same = (seg_q[:, :, None] == seg_k[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


IMPLS = ("xla", "cudnn", "chunked", "auto")


def check_impl(name: str, impl: str) -> str:
    """`impl` if it is one of IMPLS, else ValueError naming `name` and the allowed values."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS} (module doc of "
                         f"tttjax.ops.attention), got {impl!r}")
    return impl


def resolve_impl(name: str, impl: str) -> str:
    """`check_impl`, then "auto" resolved for the platform of the program being traced."""
    return platform.attention_impl(check_impl(name, impl))


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                   impl: str = "xla", chunk: int = 1024, key_mask: jax.Array | None = None,
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """Softmax attention over the whole sequence.

    Args:
      q: [B, H, Lq, d]; k, v: [B, H, Lk, d] (Lq == Lk when causal).
      causal: mask keys after the query position.
      impl: "xla" (default), "cudnn", "chunked" (`chunked_attention` with blocks of `chunk`)
        or "auto" (module doc).
      key_mask, segment_ids: optional padding / packing masks (module doc).
    Returns:
      [B, H, Lq, d] in q's dtype.
    """
    impl = resolve_impl("full_attention", impl)
    if impl == "chunked":
        return chunked_attention(q, k, v, chunk=chunk, causal=causal, key_mask=key_mask,
                                 segment_ids=segment_ids)
    _check_qkv("full_attention", q, k, v, same_length=causal)
    _check_token_masks("full_attention", q, k, key_mask, segment_ids)
    mask = _token_mask(key_mask, segment_ids, segment_ids)
    t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, H, L, d] <-> [B, L, H, d]
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, is_causal=causal,
                                          implementation=impl))


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk: int = 1024,
                      causal: bool = False, key_mask: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
    """`full_attention` with an online softmax over key blocks (flash-attention order).

    Args:
      q: [B, H, Lq, d]; k, v: [B, H, Lk, d]; chunk: query and key block size.
      key_mask: optional [B, Lk] bool, False for keys no query may see (padding).
      segment_ids: optional [B, L] int (Lq == Lk): queries see keys of their own id only.
    Returns:
      [B, H, Lq, d] in q's dtype. Memory O((Lq + Lk) * d + chunk^2) per head.
    """
    _check_qkv("chunked_attention", q, k, v, same_length=causal)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_attention: chunk must be a positive int, got {chunk!r}")
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    cq, ck = min(chunk, lq), min(chunk, lk)
    nq, nk = -(-lq // cq), -(-lk // ck)
    scale = d ** -0.5
    qb = jnp.moveaxis(_pad_length(q, 0, nq * cq - lq).reshape(bsz, heads, nq, cq, d), 2, 0)
    kb = jnp.moveaxis(_pad_length(k, 0, nk * ck - lk).reshape(bsz, heads, nk, ck, d), 2, 0)
    vb = jnp.moveaxis(_pad_length(v, 0, nk * ck - lk).reshape(bsz, heads, nk, ck, v.shape[-1]), 2, 0)
    _check_token_masks("chunked_attention", q, k, key_mask, segment_ids)
    valid = jnp.arange(nk * ck) < lk
    valid = jnp.broadcast_to(valid, (bsz, nk * ck)) if key_mask is None else (
        jnp.pad(key_mask.astype(bool), ((0, 0), (0, nk * ck - lk))))
    mb = jnp.moveaxis(valid.reshape(bsz, nk, ck), 1, 0)           # [nk, B, ck]
    if segment_ids is None:   # unused: the key block masks ignore them
        seg_q, seg_k = jnp.zeros((nq, bsz, 1), jnp.int32), jnp.zeros((nk, bsz, 1), jnp.int32)
    else:
        seg_q = jnp.moveaxis(jnp.pad(segment_ids, ((0, 0), (0, nq * cq - lq))).reshape(bsz, nq, cq), 1, 0)
        seg_k = jnp.moveaxis(jnp.pad(segment_ids, ((0, 0), (0, nk * ck - lk))).reshape(bsz, nk, ck), 1, 0)

    def query_block(_, inputs):
        qi, q_blk, sq = inputs
        q_pos = qi * cq + jnp.arange(cq)

        def key_block(carry, kin):
            m, l, acc = carry
            kj, k_blk, v_blk, k_valid, sk = kin
            k_pos = kj * ck + jnp.arange(ck)
            mask = k_valid[:, None, None, :]                       # [B, 1, 1, ck]
            if segment_ids is not None:
                mask = mask & (sq[:, None, :, None] == sk[:, None, None, :])
            if causal:
                mask = mask & (k_pos[None, :] <= q_pos[:, None])
            s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32)
            s = jnp.where(mask, s * scale, _MASKED)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk,
                                                     preferred_element_type=jnp.float32)
            return (m_new, l * corr + p.sum(-1), acc), None

        init = (jnp.full((bsz, heads, cq), _MASKED, jnp.float32),
                jnp.zeros((bsz, heads, cq), jnp.float32),
                jnp.zeros((bsz, heads, cq, v.shape[-1]), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(nk), kb, vb, mb, seg_k))
        return None, acc / jnp.maximum(l, 1e-30)[..., None]

    _, out = jax.lax.scan(jax.checkpoint(query_block), None, (jnp.arange(nq), qb, seg_q))
    out = jnp.moveaxis(out, 0, 2).reshape(bsz, heads, nq * cq, v.shape[-1])[:, :, :lq]
    return out.astype(q.dtype)


def _window_block_size(left: int, right: int, length: int) -> int:
    # Blocks of about a quarter of the window keep the wasted (masked) keys near 25 %.
    want = max(16, 1 << max(0, math.ceil(math.log2(max(1, (left + right + 1) // 4)))))
    return min(1024, want, 1 << math.ceil(math.log2(max(1, length))))


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                             window: tuple[int, int], block_size: int | None = None,
                             impl: str = "chunked", key_mask: jax.Array | None = None,
                             segment_ids: jax.Array | None = None) -> jax.Array:
    """Token i attends to keys i - left .. i + right (clipped to the sequence).

    `window=(left, 0)` is causal sliding-window attention; `(w, w)` a symmetric window.

    Args:
      q, k, v: [B, H, L, d].
      window: (left, right) non-negative ints.
      block_size: query block size of the blocked form (default: about a quarter of the
        window, 16..1024).
      impl: "chunked" (default: the blocked form, any backend), or "cudnn" / "xla" to hand the
        window to `jax.nn.dot_product_attention(local_window_size=...)` ("cudnn": fused
        kernel on NVIDIA GPUs; "xla" builds an L x L mask and is for checking only), or
        "auto" (module doc).
      key_mask, segment_ids: optional padding / packing masks (module doc); the window counts
        positions, so padding inside it is not replaced by further keys (`tttjax.ops.packing`
        moves padding to the end first).
    Returns:
      [B, H, L, d] in q's dtype. In the blocked form each query block of c tokens reads the
      `ceil(left/c) + 1 + ceil(right/c)` key blocks around it (gathered by shifted slices),
      so memory is O(L * (left + right + c)), never L x L.
    """
    _check_qkv("sliding_window_attention", q, k, v)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, (int, np.integer)) and w >= 0 for w in window)):
        raise ValueError(f"sliding_window_attention: window must be (left, right) with ints >= 0, "
                         f"got {window!r}")
    left, right = int(window[0]), int(window[1])
    impl = resolve_impl("sliding_window_attention", impl)
    _check_token_masks("sliding_window_attention", q, k, key_mask, segment_ids)
    if impl != "chunked":
        t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
        return t(jax.nn.dot_product_attention(t(q), t(k), t(v), local_window_size=(left, right),
                                              mask=_token_mask(key_mask, segment_ids, segment_ids),
                                              implementation=impl))
    bsz, heads, length, d = q.shape
    dv = v.shape[-1]
    c = _window_block_size(left, right, length) if block_size is None else int(block_size)
    if c < 1:
        raise ValueError(f"sliding_window_attention: block_size must be >= 1, got {block_size}")
    n = -(-length // c)
    ml, mr = min(-(-left // c), n - 1), min(-(-right // c), n - 1)
    span = (ml + 1 + mr) * c

    def key_windows(a):
        # Padded so block j's window is blocks j .. j + ml + mr; built from shifted slices
        # (a gather-free stack) so the backward pass is plain slicing and adds.
        a = _pad_length(a, ml * c, (n + mr) * c - length)
        blocks = a.reshape(bsz, a.shape[1], n + ml + mr, c, a.shape[-1])
        win = jnp.concatenate([blocks[:, :, t:t + n] for t in range(ml + 1 + mr)], axis=3)
        return jnp.moveaxis(win, 2, 0)                          # [n, B, H, span, d]

    qb = jnp.moveaxis(_pad_length(q, 0, n * c - length).reshape(bsz, heads, n, c, d), 2, 0)
    kw, vw = key_windows(k), key_windows(v)
    scale = d ** -0.5
    # per-token masks ride along as [B, 1, L, 1] "heads" of the same windows
    as_tokens = lambda a: a[:, None, :, None]  # noqa: E731
    km = None if key_mask is None else key_windows(as_tokens(key_mask.astype(jnp.int32)))[..., 0]
    if segment_ids is None:
        sq = sk = None
    else:
        sq = jnp.moveaxis(jnp.pad(segment_ids, ((0, 0), (0, n * c - length))).reshape(bsz, n, c), 1, 0)
        sk = key_windows(as_tokens(segment_ids))[..., 0]           # [n, B, 1, span]

    def block(_, inputs):
        j, q_blk, k_win, v_win, km_win, sq_blk, sk_win = inputs
        q_pos = j * c + jnp.arange(c)
        k_pos = (j - ml) * c + jnp.arange(span)
        rel = k_pos[None, :] - q_pos[:, None]
        mask = (rel >= -left) & (rel <= right) & (k_pos[None, :] >= 0) & (k_pos[None, :] < length)
        if km_win is not None:
            mask = mask & (km_win[:, :, None, :] != 0)             # [B, 1, c, span]
        if sq_blk is not None:
            mask = mask & (sq_blk[:, None, :, None] == sk_win[:, :, None, :])
        return None, _softmax_attend(q_blk, k_win, v_win, mask, scale)

    _, out = jax.lax.scan(jax.checkpoint(block), None, (jnp.arange(n), qb, kw, vw, km, sq, sk))
    out = jnp.moveaxis(out, 0, 2).reshape(bsz, heads, n * c, dv)[:, :, :length]
    return out.astype(q.dtype)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int,
                    causal: bool = False, chunk: int = 1024) -> jax.Array:
    """Attention inside consecutive non-overlapping windows of `window` tokens.

    Args:
      q, k, v: [B, H, L, d]; a last partial window is padded and its padding masked.
      window: tokens per window.
      causal: causal mask inside each window.
      chunk: windows longer than this run `chunked_attention` (online softmax over blocks
        of `chunk` keys) with the windows folded into the batch; shorter ones materialise
        their window x window logits, one window at a time.
    Returns:
      [B, H, L, d] in q's dtype; memory O(min(window, chunk) * window) per head at a time.
    """
    _check_qkv("local_attention", q, k, v)
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"local_attention: window must be a positive int, got {window!r}")
    bsz, heads, length, d = q.shape
    dv = v.shape[-1]
    w = min(int(window), length)
    n = -(-length // w)

    if w > chunk:
        def fold(a):  # windows into the batch: [B * n, H, w, d]
            a = _pad_length(a, 0, n * w - length).reshape(bsz, heads, n, w, a.shape[-1])
            return a.transpose(0, 2, 1, 3, 4).reshape(bsz * n, heads, w, a.shape[-1])

        key_mask = jnp.broadcast_to((jnp.arange(n * w) < length).reshape(n, w), (bsz, n, w))
        out = chunked_attention(fold(q), fold(k), fold(v), chunk=chunk, causal=causal,
                                key_mask=key_mask.reshape(bsz * n, w))
        out = out.reshape(bsz, n, heads, w, dv).transpose(0, 2, 1, 3, 4)
        return out.reshape(bsz, heads, n * w, dv)[:, :, :length]

    def blocks(a):
        a = _pad_length(a, 0, n * w - length)
        return jnp.moveaxis(a.reshape(bsz, heads, n, w, a.shape[-1]), 2, 0)

    pos = jnp.arange(w)
    scale = d ** -0.5

    def block(_, inputs):
        j, q_blk, k_blk, v_blk = inputs
        mask = (j * w + pos)[None, :] < length
        if causal:
            mask = mask & (pos[None, :] <= pos[:, None])
        return None, _softmax_attend(q_blk, k_blk, v_blk, mask, scale)

    _, out = jax.lax.scan(jax.checkpoint(block), None, (jnp.arange(n), blocks(q), blocks(k), blocks(v)))
    out = jnp.moveaxis(out, 0, 2).reshape(bsz, heads, n * w, dv)[:, :, :length]
    return out.astype(q.dtype)


def segment_windows(num_segments: int, frames_per_window: int, overlap_frames: int) -> np.ndarray:
    """[n_seg, frames_per_window] latent frame indices of every window (static)."""
    stride = frames_per_window - overlap_frames
    return stride * np.arange(num_segments)[:, None] + np.arange(frames_per_window)[None, :]


def segment_attention(text_q: jax.Array, text_k: jax.Array, text_v: jax.Array,
                      video_q: jax.Array, video_k: jax.Array, video_v: jax.Array, *,
                      frame_tokens: int, frames_per_window: int = 13, overlap_frames: int = 1,
                      video_rope: tuple[jax.Array, jax.Array] | None = None,
                      impl: str = "xla", chunk: int = 1024
                      ) -> tuple[jax.Array, jax.Array]:
    """Joint text + video attention inside the DiT's 3-second windows (docs/design.md §2).

    Window i holds latent frames `stride*i .. stride*i + frames_per_window - 1` with
    `stride = frames_per_window - overlap_frames` (adjacent windows share `overlap_frames`
    frames), and attends non-causally over `[text_i ; video window i]`. A video token that
    lies in two windows gets the average of its two outputs.

    Args:
      text_q, text_k, text_v: [B, H, n_seg, S, d] (one prompt per window).
      video_q, video_k, video_v: [B, H, T * frame_tokens, d] with
        T = stride * n_seg + overlap_frames (13, 25, 37, ... for 13-frame windows).
      frame_tokens: video tokens per latent frame (h * w).
      frames_per_window, overlap_frames: window geometry; needs
        0 <= overlap_frames <= frames_per_window - overlap_frames (a token is in <= 2 windows).
      video_rope: optional (cos, sin), each [frames_per_window * frame_tokens, d]: local
        positions, applied to the video q/k of every window inside the window loop.
      impl: "xla" (default) or "cudnn": `jax.nn.dot_product_attention` per window; "chunked":
        `chunked_attention` per window, an online softmax over blocks of `chunk` keys, so no
        window's [S + window, S + window] logits are ever stored (the flash-attention order
        for backends without a fused kernel, e.g. TPU or CPU plans); "auto" (module doc).
      chunk: query / key block of impl "chunked".
    Returns:
      (text_out [B, H, n_seg, S, d], video_out [B, H, T * frame_tokens, d]) in q's dtype.
      One window's logits (or, chunked, one block's) live at a time (scan over windows,
      rematerialised in backward).
    """
    name = "segment_attention"
    if text_q.ndim != 5 or text_k.shape != text_q.shape or text_v.shape[:4] != text_q.shape[:4]:
        raise ValueError(f"{name}: text q/k/v must be [B, H, n_seg, S, d], got {text_q.shape}, "
                         f"{text_k.shape}, {text_v.shape}")
    bsz, heads, n, s, d = text_q.shape
    for label, a in (("video_q", video_q), ("video_k", video_k), ("video_v", video_v)):
        if a.ndim != 4 or a.shape[:2] != (bsz, heads):
            raise ValueError(f"{name}: {label} must be [B, H, T*frame_tokens, d] with B, H = "
                             f"{bsz}, {heads}, got {a.shape}")
    if video_k.shape != video_q.shape or video_v.shape[:3] != video_q.shape[:3]:
        raise ValueError(f"{name}: video q/k/v shapes disagree: {video_q.shape}, {video_k.shape}, "
                         f"{video_v.shape}")
    if video_q.shape[3] != d or text_v.shape[4] != video_v.shape[3]:
        raise ValueError(f"{name}: text and video head dims differ: q {d} vs {video_q.shape[3]}, "
                         f"v {text_v.shape[4]} vs {video_v.shape[3]}")
    fpw, o = frames_per_window, overlap_frames
    if not (isinstance(fpw, int) and isinstance(o, int) and fpw >= 1 and 0 <= o <= fpw - o):
        raise ValueError(f"{name}: need 0 <= overlap_frames <= frames_per_window - overlap_frames, "
                         f"got frames_per_window={fpw!r}, overlap_frames={o!r}")
    if not isinstance(frame_tokens, int) or frame_tokens < 1:
        raise ValueError(f"{name}: frame_tokens must be a positive int, got {frame_tokens!r}")
    impl = resolve_impl(name, impl)
    if impl == "chunked" and not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"{name}: chunk must be a positive int, got {chunk!r}")
    ft, stride = frame_tokens, fpw - o
    frames = stride * n + o
    if video_q.shape[2] != frames * ft:
        raise ValueError(
            f"{name}: {n} text segments with {fpw}-frame windows overlapping by {o} need "
            f"{frames} latent frames = {frames * ft} video tokens ({ft} per frame), got "
            f"{video_q.shape[2]} tokens; pass one prompt per window")
    win_len = fpw * ft
    if video_rope is not None:
        cos, sin = video_rope
        if cos.shape != (win_len, d) or sin.shape != (win_len, d):
            raise ValueError(f"{name}: video_rope tables must each be [frames_per_window * "
                             f"frame_tokens, d] = {(win_len, d)} (local positions, reused by "
                             f"every window), got {cos.shape} and {sin.shape}")

    def windows(a):
        dd = a.shape[-1]
        f = a.reshape(bsz, heads, frames, ft, dd)
        win = f[:, :, :n * stride].reshape(bsz, heads, n, stride, ft, dd)
        if o:
            # The frames after each window's own stride: the next window's first `o` frames
            # (the shared frames), taken from a view shifted by one stride.
            nxt = jnp.pad(f[:, :, stride:], ((0, 0), (0, 0), (0, stride - o), (0, 0), (0, 0)))
            nxt = nxt.reshape(bsz, heads, n, stride, ft, dd)[:, :, :, :o]
            win = jnp.concatenate([win, nxt], axis=3)
        return jnp.moveaxis(win.reshape(bsz, heads, n, win_len, dd), 2, 0)

    lead = lambda a: jnp.moveaxis(a, 2, 0)  # noqa: E731  [n, B, H, S, d]
    xs = (lead(text_q), lead(text_k), lead(text_v), windows(video_q), windows(video_k),
          windows(video_v))
    t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, H, L, d] <-> [B, L, H, d]

    def window(_, inputs):
        tq, tk, tv, wq, wk, wv = inputs
        if video_rope is not None:
            wq, wk = apply_rope(wq, *video_rope), apply_rope(wk, *video_rope)
        q = jnp.concatenate([tq, wq], axis=2)
        k = jnp.concatenate([tk, wk], axis=2)
        v = jnp.concatenate([tv, wv], axis=2)
        if impl == "chunked":
            y = chunked_attention(q, k, v, chunk=chunk)
        else:
            y = t(jax.nn.dot_product_attention(t(q), t(k), t(v), implementation=impl))
        return None, (y[:, :, :s], y[:, :, s:])

    _, (text_out, video_win) = jax.lax.scan(jax.checkpoint(window), None, xs)
    text_out = jnp.moveaxis(text_out, 0, 2)                            # [B, H, n, S, dv]

    dv = video_v.shape[-1]
    yw = jnp.moveaxis(video_win, 0, 2).reshape(bsz, heads, n, fpw, ft, dv)
    frame_pad = lambda a, before, after: jnp.pad(  # noqa: E731
        a, ((0, 0), (0, 0), (before, after), (0, 0), (0, 0)))
    total = frame_pad(yw[:, :, :, :stride].reshape(bsz, heads, n * stride, ft, dv), 0, stride)
    if o:
        # Each window's last `o` frames land on the first frames of the next window's stride.
        tail = jnp.pad(yw[:, :, :, stride:], ((0, 0),) * 3 + ((0, stride - o), (0, 0), (0, 0)))
        total = total + frame_pad(tail.reshape(bsz, heads, n * stride, ft, dv), stride, 0)
    counts = np.bincount(segment_windows(n, fpw, o).ravel(), minlength=frames).astype(np.float32)
    video_out = total[:, :, :frames] / jnp.asarray(counts)[:, None, None]
    video_out = video_out.reshape(bsz, heads, frames * ft, dv)
    return text_out.astype(text_q.dtype), video_out.astype(video_q.dtype)
