"""Blocked attention forms against dense masked attention; segment attention against a
per-window loop (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttjax.ops import attention as A
from tttjax.ops.rope import rope_3d


def np_attention(q, k, v, mask=None):
    s = np.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def jnp_attention(q, k, v, mask=None):
    s = jnp.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1) @ v


def band(length, left, right):
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    return (rel >= -left) & (rel <= right)


def qkv(seed, shape):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape) for _ in range(3))


f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
B, H, L, D = 2, 2, 53, 8

# jitted wrappers: one compile per configuration instead of op-by-op eager dispatch
swa = jax.jit(A.sliding_window_attention, static_argnames=("window", "block_size", "impl"))
chunked = jax.jit(A.chunked_attention, static_argnames=("chunk", "causal"))
local = jax.jit(A.local_attention, static_argnames=("window", "causal", "chunk"))
segment = jax.jit(A.segment_attention, static_argnames=("frame_tokens", "frames_per_window",
                                                         "overlap_frames", "impl",
                                                         "chunk"))
# "chunked" with a block that divides no window length (S + fpw * ft) below: padded key blocks.
SEGMENT_IMPLS = [dict(), dict(impl="chunked", chunk=4)]


@pytest.mark.parametrize("window,block", [((5, 0), None), ((7, 3), 4), ((0, 0), None),
                                          ((60, 60), 16), ((16, 16), None), ((20, 2), 8)])
def test_sliding_window_equals_masked_full_attention(window, block):
    q, k, v = qkv(0, (B, H, L, D))
    out = swa(f32(q), f32(k), f32(v), window=window, block_size=block)
    np.testing.assert_allclose(out, np_attention(q, k, v, band(L, *window)), rtol=1e-5, atol=2e-6)
    if block is None:  # jax's local_window_size (the cudnn path on GPU) means the same window
        dense = swa(f32(q), f32(k), f32(v), window=window, impl="xla")
        np.testing.assert_allclose(dense, out, rtol=1e-5, atol=2e-6)


def test_full_chunked_and_local_attention():
    q, k, v = qkv(1, (B, H, L, D))
    causal = band(L, L, 0)
    np.testing.assert_allclose(A.full_attention(f32(q), f32(k), f32(v)), np_attention(q, k, v),
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(A.full_attention(f32(q), f32(k), f32(v), causal=True),
                               np_attention(q, k, v, causal), rtol=1e-5, atol=2e-6)
    for chunk in (16, 100):
        np.testing.assert_allclose(chunked(f32(q), f32(k), f32(v), chunk=chunk),
                                   np_attention(q, k, v), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(chunked(f32(q), f32(k), f32(v), chunk=16, causal=True),
                               np_attention(q, k, v, causal), rtol=1e-5, atol=2e-6)
    same_window = (np.arange(L)[:, None] // 10) == (np.arange(L)[None, :] // 10)
    np.testing.assert_allclose(local(f32(q), f32(k), f32(v), window=10),
                               np_attention(q, k, v, same_window), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(local(f32(q), f32(k), f32(v), window=10, causal=True),
                               np_attention(q, k, v, same_window & causal), rtol=1e-5, atol=2e-6)
    for chunk in (4, 7):  # windows longer than the chunk: online softmax, windows in the batch
        np.testing.assert_allclose(local(f32(q), f32(k), f32(v), window=10, chunk=chunk,
                                                     causal=chunk == 7),
                                   np_attention(q, k, v, same_window & (causal if chunk == 7 else True)),
                                   rtol=1e-5, atol=2e-6)


def _grads(fn, q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def test_blocked_gradients_match_dense():
    q, k, v = qkv(2, (1, 2, 45, D))
    w = np.random.default_rng(3).standard_normal(q.shape)
    mask = band(45, 9, 4)
    with jax.enable_x64(True):
        ref_band = [np.asarray(g) for g in _grads(lambda *a: jnp_attention(*a, mask), q, k, v, w)]
        ref_full = [np.asarray(g) for g in _grads(lambda *a: jnp_attention(*a, band(45, 45, 0)), q, k, v, w)]
    got_band = jax.jit(lambda *a: _grads(lambda *b: A.sliding_window_attention(*b, window=(9, 4), block_size=8),
                                         *a, f32(w)))(f32(q), f32(k), f32(v))
    got_full = jax.jit(lambda *a: _grads(lambda *b: A.chunked_attention(*b, chunk=16, causal=True),
                                         *a, f32(w)))(f32(q), f32(k), f32(v))
    for got, ref in ((got_band, ref_band), (got_full, ref_full)):
        for name, a, b in zip("qkv", got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def segment_reference(xp, tq, tk, tv, vq, vk, vv, ft, fpw, o, rope):
    """Loop over windows: joint attention on [text_i; rotated video window i], average overlaps."""
    b, h, n, s, d = tq.shape
    frames = (fpw - o) * n + o
    cos, sin = rope

    def rot(a):
        pairs = a.reshape(*a.shape[:-1], -1, 2)
        return a * cos + xp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(a.shape) * sin

    def frames_of(a):
        return a.reshape(b, h, frames, ft, d)

    video_sum = xp.zeros((b, h, frames, ft, d))
    count = np.zeros(frames)
    text_out = []
    for i in range(n):
        fr = np.arange((fpw - o) * i, (fpw - o) * i + fpw)
        win = lambda a: frames_of(a)[:, :, fr].reshape(b, h, fpw * ft, d)  # noqa: E731
        q = xp.concatenate([tq[:, :, i], rot(win(vq))], 2)
        k = xp.concatenate([tk[:, :, i], rot(win(vk))], 2)
        v = xp.concatenate([tv[:, :, i], win(vv)], 2)
        y = np_attention(q, k, v) if xp is np else jnp_attention(q, k, v)
        text_out.append(y[:, :, :s])
        start = fr[0]
        pad = ((0, 0), (0, 0), (start, frames - start - fpw), (0, 0), (0, 0))
        add = xp.pad(y[:, :, s:].reshape(b, h, fpw, ft, d), pad)
        video_sum = video_sum + add
        count[fr] += 1
    video = (video_sum / count[:, None, None]).reshape(b, h, frames * ft, d)
    return xp.stack(text_out, 2), video


def segment_inputs(seed, n, fpw, o, ft, s=3, d=16):
    rng = np.random.default_rng(seed)
    frames = (fpw - o) * n + o
    text = [rng.standard_normal((B, H, n, s, d)) for _ in range(3)]
    video = [rng.standard_normal((B, H, frames * ft, d)) for _ in range(3)]
    rope = tuple(np.asarray(t, np.float64) for t in rope_3d((fpw, 1, ft), d))
    return text + video, rope


@pytest.mark.parametrize("impl", SEGMENT_IMPLS)
@pytest.mark.parametrize("n,fpw,o,ft", [(3, 3, 1, 4), (2, 5, 2, 3), (2, 4, 0, 2), (1, 13, 1, 2)])
def test_segment_attention_equals_per_window_loop(n, fpw, o, ft, impl):
    arrays, rope = segment_inputs(0, n, fpw, o, ft)
    text, video = segment(*map(f32, arrays), frame_tokens=ft, frames_per_window=fpw,
                          overlap_frames=o, video_rope=tuple(map(f32, rope)), **impl)
    ref_text, ref_video = segment_reference(np, *arrays, ft, fpw, o, rope)
    np.testing.assert_allclose(text, ref_text, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(video, ref_video, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", SEGMENT_IMPLS)
def test_segment_attention_gradients(impl):
    n, fpw, o, ft = 3, 3, 1, 4
    arrays, rope = segment_inputs(1, n, fpw, o, ft)
    rng = np.random.default_rng(2)
    w_t, w_v = rng.standard_normal(arrays[0].shape), rng.standard_normal(arrays[3].shape)

    def loss(fn, *a):
        t, v = fn(*a)
        return jnp.sum(t * w_t) + jnp.sum(v * w_v)

    ours = lambda *a: A.segment_attention(*a, frame_tokens=ft, frames_per_window=fpw,  # noqa: E731
                                          overlap_frames=o, video_rope=tuple(map(f32, rope)),
                                          **impl)
    got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=tuple(range(6))))(*map(f32, arrays))
    with jax.enable_x64(True):
        ref = lambda *a: segment_reference(jnp, *a, ft, fpw, o, rope)  # noqa: E731
        want = jax.grad(lambda *a: loss(ref, *a), argnums=tuple(range(6)))(*map(jnp.asarray, arrays))
        want = [np.asarray(w) for w in want]
    for name, a, b in zip(("tq", "tk", "tv", "vq", "vk", "vv"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_bad_inputs_raise():
    arrays, rope = segment_inputs(3, 2, 3, 1, 2)
    arrays = list(map(f32, arrays))
    with pytest.raises(ValueError, match="need 5 latent frames"):
        A.segment_attention(*arrays[:3], *(a[:, :, :-2] for a in arrays[3:]), frame_tokens=2,
                            frames_per_window=3, overlap_frames=1)
    with pytest.raises(ValueError, match="video_rope"):
        A.segment_attention(*arrays, frame_tokens=2, frames_per_window=3, overlap_frames=1,
                            video_rope=(f32(rope[0][:3]), f32(rope[1][:3])))
    with pytest.raises(ValueError, match="overlap_frames"):
        A.segment_attention(*arrays, frame_tokens=2, frames_per_window=3, overlap_frames=2)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        A.segment_attention(*arrays, frame_tokens=2, frames_per_window=3, overlap_frames=1,
                            impl="chunked", chunk=0)
    q = jnp.zeros((1, 2, 8, 4))
    with pytest.raises(ValueError, match="window must be"):
        A.sliding_window_attention(q, q, q, window=(-1, 2))
    with pytest.raises(ValueError, match="same length"):
        A.sliding_window_attention(q, q[:, :, :4], q[:, :, :4], window=(1, 1))


def test_key_mask_and_segment_ids_in_every_form():
    """Padding keys and packed sequences (block diagonal) against dense masked attention, for
    the full, chunked and windowed forms (causal and not); padding queries are not compared."""
    q, k, v = qkv(11, (B, H, 21, D))
    rng = np.random.default_rng(12)
    ids = np.stack([np.repeat([0, 1, 2], [6, 9, 6]), np.repeat([5, 3], [14, 7])])
    valid = rng.random((B, 21)) > 0.25
    valid[:, [0, 6, 14]] = True                  # every sequence keeps a real first token
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    masks = dict(key_mask=jnp.asarray(valid), segment_ids=jnp.asarray(ids))
    cases = {
        "full": (lambda: A.full_attention(f32(q), f32(k), f32(v), **masks), same),
        "full causal": (lambda: A.full_attention(f32(q), f32(k), f32(v), causal=True, **masks),
                        same & band(21, 21, 0)),
        "chunked": (lambda: A.chunked_attention(f32(q), f32(k), f32(v), chunk=4, **masks), same),
        "chunked causal": (lambda: A.chunked_attention(f32(q), f32(k), f32(v), chunk=4,
                                                       causal=True, **masks),
                           same & band(21, 21, 0)),
        "window": (lambda: A.sliding_window_attention(f32(q), f32(k), f32(v), window=(3, 2),
                                                      block_size=4, **masks),
                   same & band(21, 3, 2)),
        "window xla": (lambda: A.sliding_window_attention(f32(q), f32(k), f32(v), window=(3, 2),
                                                          impl="xla", **masks),
                       same & band(21, 3, 2)),
    }
    for name, (fn, mask) in cases.items():
        want = np_attention(q, k, v, mask[:, None])
        seen = mask.any(-1)                        # queries with at least one visible key
        got = np.asarray(fn())
        np.testing.assert_allclose(got.transpose(0, 2, 1, 3)[seen], want.transpose(0, 2, 1, 3)[seen],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="key_mask must be"):
        A.full_attention(f32(q), f32(k), f32(v), key_mask=jnp.ones((B, 20), bool))
    with pytest.raises(ValueError, match="segment_ids must be"):
        A.chunked_attention(f32(q), f32(k), f32(v), segment_ids=jnp.zeros((B, 20), jnp.int32))


def test_impl_values_are_one_set_for_every_op_and_layer():
    """`impl` means the same in every attention op and layer: "chunked" and "auto" (on CPU:
    chunked) give the dense softmax; a value outside the set (None included) is refused in one
    line naming the allowed values."""
    from flax import nnx

    from tttjax.layers.attention_mixers import FullAttention, SlidingWindowAttention

    q, k, v = qkv(21, (B, H, 19, D))
    want = np_attention(q, k, v, band(19, 19, 0))
    for impl in A.IMPLS:
        if impl == "cudnn":
            continue   # NVIDIA GPUs only
        got = A.full_attention(f32(q), f32(k), f32(v), causal=True, impl=impl, chunk=4)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=impl)
    allowed = r"impl must be one of \('xla', 'cudnn', 'chunked', 'auto'\)"
    for bad in (None, "pallas", "blocked"):
        with pytest.raises(ValueError, match="full_attention: " + allowed):
            A.full_attention(f32(q), f32(k), f32(v), impl=bad)
        with pytest.raises(ValueError, match="sliding_window_attention: " + allowed):
            A.sliding_window_attention(f32(q), f32(k), f32(v), window=(2, 2), impl=bad)
        with pytest.raises(ValueError, match="FullAttention: " + allowed):
            FullAttention(16, 2, impl=bad, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="SlidingWindowAttention: " + allowed):
            SlidingWindowAttention(16, 2, window=4, impl=bad, rngs=nnx.Rngs(0))
