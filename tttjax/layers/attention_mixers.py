"""Softmax-attention sequence mixers: full, sliding-window and local attention.

All three share the CogVideoX attention layout: q/k/v/o projections `Linear(D, D)` with bias
(N(0, 0.02), bias 0), optional per-head LayerNorm on q and k (eps 1e-6, as CogVideoX), RoPE
from the `rope` argument applied to q and k, and differ only in which keys a query sees:

- `FullAttention`: every key (causal: every earlier key). O(L^2).
- `SlidingWindowAttention`: `window` keys around the query (the paper: 8192 tokens, about
  1.5 s of 480x720 video). Causal: the query and the `window - 1` keys before it; otherwise
  `window // 2` keys before and `window - 1 - window // 2` after. O(L * window).
- `LocalAttention`: non-overlapping windows of `window` tokens (attention cost of the
  paper's local-attention-only baseline; used by the mixer benchmark). O(L * window).

Call: `layer(x [B, L, D], *, rope=None, mask=None, segment_ids=None) -> [B, L, D]` with rope
(cos, sin) each [L, d] or [B, L, d]. `mask` (0 = padding) and `segment_ids` (packed
sequences) are the keywords of `TTTMLP.__call__`, applied through the attention mask: padding
keys are never seen, and a query sees only keys of its own sequence (block diagonal). As in
the recurrent mixers the real tokens are first moved to the front (`tttjax.ops.packing`), so a
window counts real tokens only and each token keeps its own rope row. Attention keeps no
state between calls: `initial_state` / `return_state` are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tttjax.logical_params import logical_init, logical_param
from tttjax.ops import attention as attention_ops
from tttjax.ops.packing import token_layout
from tttjax.ops.rope import apply_rope
from tttjax.sharding import BHLD, BLD, with_logical_constraint

_INIT_STD = 0.02
_QK_NORM_EPS = 1e-6


class _AttentionMixer(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, causal: bool = False, qk_norm: bool = True,
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        name = type(self).__name__
        if width % num_heads:
            raise ValueError(f"{name}: width {width} must be divisible by num_heads {num_heads}")
        self.width, self.num_heads, self.head_dim = width, num_heads, width // num_heads
        self.causal, self.dtype = causal, dtype
        normal = nnx.initializers.normal(_INIT_STD)

        def linear(names):
            return nnx.Linear(width, width, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=logical_init(normal, names),
                              bias_init=logical_init(nnx.initializers.zeros, names[1:]),
                              rngs=rngs)

        self.wq, self.wk, self.wv = (linear(("embed", "heads")) for _ in range(3))
        self.wo = linear(("heads", "embed"))
        self.qk_norm = qk_norm
        if qk_norm:
            d = self.head_dim
            ones = lambda: logical_param(jnp.ones((d,), param_dtype), ("kv",))  # noqa: E731
            zeros = lambda: logical_param(jnp.zeros((d,), param_dtype), ("kv",))  # noqa: E731
            self.q_norm_scale, self.q_norm_bias = ones(), zeros()
            self.k_norm_scale, self.k_norm_bias = ones(), zeros()

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask=None,
                segment_ids=None) -> jax.Array:
        raise TypeError(f"{type(self).__name__} is abstract; use FullAttention, "
                        "SlidingWindowAttention or LocalAttention")

    @staticmethod
    def _layer_norm(y, scale, bias):
        yf = y.astype(jnp.float32)
        mu = jnp.mean(yf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(yf - mu), axis=-1, keepdims=True)
        out = (yf - mu) * jax.lax.rsqrt(var + _QK_NORM_EPS) * scale[...] + bias[...]
        return out.astype(y.dtype)

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
                 mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 initial_state=None, return_state: bool = False) -> jax.Array:
        """x [B, L, D] -> [B, L, D]; rope: optional (cos, sin) each [L, d] or [B, L, d];
        mask [B, L] or [L] (0 = padding) and segment_ids [B, L] int as in the module doc."""
        name = type(self).__name__
        if initial_state is not None or return_state:
            raise ValueError(f"{name}: attention has no recurrent state to start from or return "
                             "(each call attends over the keys it is given); drop initial_state / "
                             "return_state, or use a recurrent mixer (ttt_mlp, ttt_linear, "
                             "gated_deltanet, mamba2)")
        bsz, length, width = x.shape
        if width != self.width:
            raise ValueError(f"{name}: input width {width} != layer width {self.width}")
        layout = token_layout(mask, segment_ids, bsz, length, name)
        x = layout.gather(x.astype(self.dtype))
        if rope is not None and layout.order is not None:   # each token keeps its own rows
            axis = 0 if rope[0].ndim == 2 else 1
            rope = (layout.gather(rope[0], axis), layout.gather(rope[1], axis))

        def heads(y):
            y = y.reshape(bsz, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
            return with_logical_constraint(y, BHLD)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        if self.qk_norm:
            q = self._layer_norm(q, self.q_norm_scale, self.q_norm_bias)
            k = self._layer_norm(k, self.k_norm_scale, self.k_norm_bias)
        if rope is not None:
            cos, sin = rope
            if cos.ndim == 3:  # per-example tables [B, L, d] -> broadcast over heads
                cos, sin = cos[:, None], sin[:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self._attend(q, k, v, key_mask=layout.valid, segment_ids=layout.segment)
        y = y.transpose(0, 2, 1, 3).reshape(bsz, length, width)
        y = with_logical_constraint(y, BLD)
        return layout.scatter(self.wo(y))


class FullAttention(_AttentionMixer):
    """Attention over the whole sequence.

    `impl`: "xla" (default) / "cudnn" (`jax.nn.dot_product_attention`), "chunked" (online
    softmax over blocks of `chunk` keys, memory O(L * chunk)) or "auto" (`tttjax.ops.attention`).
    """

    def __init__(self, width: int, num_heads: int, *, impl: str = "xla", chunk: int = 1024,
                 **kwargs):
        attention_ops.check_impl("FullAttention", impl)
        super().__init__(width, num_heads, **kwargs)
        self.impl, self.chunk = impl, chunk

    def _attend(self, q, k, v, key_mask=None, segment_ids=None):
        return attention_ops.full_attention(q, k, v, causal=self.causal, impl=self.impl,
                                            chunk=self.chunk, key_mask=key_mask,
                                            segment_ids=segment_ids)


class SlidingWindowAttention(_AttentionMixer):
    """Each query sees `window` keys: the previous `window - 1` (causal) or centred on it.

    `impl`: "chunked" (default: blocked, any backend), "cudnn" (fused windowed kernel on GPU),
    "xla" (an L x L mask, for checking) or "auto" (`tttjax.ops.attention`).
    """

    def __init__(self, width: int, num_heads: int, *, window: int = 8192,
                 block_size: int | None = None, impl: str = "chunked", **kwargs):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"SlidingWindowAttention: window must be a positive int, got {window!r}")
        attention_ops.check_impl("SlidingWindowAttention", impl)
        super().__init__(width, num_heads, **kwargs)
        self.window, self.block_size, self.impl = window, block_size, impl

    @property
    def extent(self) -> tuple[int, int]:
        """(left, right) keys around each query."""
        if self.causal:
            return self.window - 1, 0
        return self.window // 2, self.window - 1 - self.window // 2

    def _attend(self, q, k, v, key_mask=None, segment_ids=None):
        return attention_ops.sliding_window_attention(q, k, v, window=self.extent,
                                                      block_size=self.block_size,
                                                      impl=self.impl,
                                                      key_mask=key_mask, segment_ids=segment_ids)


class LocalAttention(_AttentionMixer):
    """Attention inside consecutive non-overlapping windows of `window` tokens (windows
    longer than `chunk` use the online-softmax form)."""

    def __init__(self, width: int, num_heads: int, *, window: int = 8192, chunk: int = 1024,
                 **kwargs):
        if not isinstance(window, int) or window < 1 or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"LocalAttention: window and chunk must be positive ints, got "
                             f"{window!r}, {chunk!r}")
        super().__init__(width, num_heads, **kwargs)
        self.window, self.chunk = window, chunk

    def _attend(self, q, k, v, key_mask=None, segment_ids=None):
        if key_mask is not None or segment_ids is not None:
            raise ValueError("LocalAttention: mask / segment_ids are not supported (its windows "
                             "are fixed positions); use FullAttention or SlidingWindowAttention")
        return attention_ops.local_attention(q, k, v, window=self.window, causal=self.causal,
                                             chunk=self.chunk)
