"""Gated DeltaNet sequence mixer (docs/design.md §7; fla's `GatedDeltaNet` layer).

    q, k, v = SiLU(causal_conv4(W_q x)), SiLU(causal_conv4(W_k x)), SiLU(causal_conv4(W_v x))
    q, k    = l2normalize(q), l2normalize(k)                   per head (fla: x / sqrt(|x|^2 + 1e-6))
    beta_t  = sigmoid(W_b x_t)                                 [H]
    g_t     = -exp(A_log) * softplus(W_a x_t + dt_bias)         [H] log-decay
    o       = gated_delta_rule(q, k, v, g, beta)               (tttjax.ops.delta_rule)
    out     = W_o (RMSNorm(o) * weight * SiLU(W_g x))          RMSNorm per head, eps 1e-5

Initialisation as fla: A ~ U(0, 16) stored as log, dt_bias = softplus^-1 of a log-uniform
dt in [1e-3, 0.1]; projections N(0, 0.02) (fla's `initializer_range`); conv kernels U(+-1/2)
(torch Conv1d default for width 4), no conv bias. Heads: `num_heads` of `d_k = width /
num_heads` (64 at the DiT's 48 x 64 shape) and `d_v = expand_v * d_k` (default 1, so value
width equals the model width; fla's default is 2 with fewer, wider heads).

The layer is causal in time; `tttjax.layers.registry` adds the reversed pass for the
bidirectional setting. RoPE is not used (the `rope` argument is accepted and ignored).

Padded and packed batches, and sequences in pieces (the keywords of `TTTMLP.__call__`):
`mask` (0 = padding: the real tokens are moved to the front, `tttjax.ops.packing`, and
padding takes a skip step beta = 0, g = 0), `segment_ids` (the delta-rule state and the short
convolutions restart from the initial state at every packed sequence), `initial_state` /
`return_state` (the state is {"delta": S [B, H, d_k, d_v], "q_conv", "k_conv", "v_conv":
the last K - 1 projected inputs [B, K - 1, C]}, all float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tttjax.layers import ssm_init
from tttjax.logical_params import logical_init, logical_param
from tttjax.ops.delta_rule import gated_delta_rule
from tttjax.ops.gated_rms_norm import gated_rms_norm
from tttjax.ops.packing import check_state, token_layout
from tttjax.sharding import BHLD, BLD, BLHD, with_logical_constraint

_INIT_STD = 0.02


def _linear(d_in, d_out, names, *, dtype, param_dtype, rngs):
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=logical_init(nnx.initializers.normal(_INIT_STD), names),
                      rngs=rngs)


def fla_l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) on the last axis, float32 (fla's l2norm)."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet mixer: `layer(x [B, L, D], *, rope=None) -> [B, L, D]`."""

    def __init__(self, width: int, num_heads: int, *, head_dim: int | None = None,
                 expand_v: float = 1.0, conv_size: int = 4, chunk_size: int = 64,
                 norm_eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if head_dim is None:
            if width % num_heads:
                raise ValueError(f"GatedDeltaNet: width {width} must be divisible by num_heads "
                                 f"{num_heads} (or give head_dim)")
            head_dim = width // num_heads
        head_v = int(head_dim * expand_v)
        if head_v < 1 or head_v != head_dim * expand_v:
            raise ValueError(f"GatedDeltaNet: head_dim {head_dim} * expand_v {expand_v} must be a "
                             "positive integer")
        if conv_size < 1 or chunk_size < 1:
            raise ValueError("GatedDeltaNet: conv_size and chunk_size must be >= 1")
        self.width, self.num_heads = width, num_heads
        self.head_dim, self.head_v_dim = head_dim, head_v
        self.chunk_size, self.norm_eps, self.dtype = chunk_size, norm_eps, dtype
        key_dim, value_dim = num_heads * head_dim, num_heads * head_v
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(width, key_dim, ("embed", "heads"), **kw)
        self.k_proj = _linear(width, key_dim, ("embed", "heads"), **kw)
        self.v_proj = _linear(width, value_dim, ("embed", "heads"), **kw)
        self.a_proj = _linear(width, num_heads, ("embed", "heads"), **kw)
        self.b_proj = _linear(width, num_heads, ("embed", "heads"), **kw)
        self.g_proj = _linear(width, value_dim, ("embed", "heads"), **kw)
        self.o_proj = _linear(value_dim, width, ("heads", "embed"), **kw)

        def conv(channels):
            value = ssm_init.uniform_fan_in(rngs.params(), (conv_size, channels), conv_size, param_dtype)
            return logical_param(value, ("conv", "heads"))

        self.q_conv, self.k_conv, self.v_conv = conv(key_dim), conv(key_dim), conv(value_dim)
        self.A_log = logical_param(
            ssm_init.a_log(rngs.params(), (num_heads,), low=0.0, high=16.0, dtype=param_dtype),
            ("heads",))
        self.dt_bias = logical_param(
            ssm_init.dt_bias(rngs.params(), (num_heads,), dtype=param_dtype), ("heads",))
        self.o_norm_weight = logical_param(jnp.ones((head_v,), param_dtype), ("kv",))

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the `initial_state` / returned state dict for a batch of `batch` rows."""
        h, k = self.num_heads, self.q_conv.shape[0] - 1
        return {"delta": (batch, h, self.head_dim, self.head_v_dim),
                "q_conv": (batch, k, h * self.head_dim), "k_conv": (batch, k, h * self.head_dim),
                "v_conv": (batch, k, h * self.head_v_dim)}

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
                 mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 initial_state: dict[str, jax.Array] | None = None, return_state: bool = False):
        """x [B, L, D] -> y [B, L, D], or (y, final state) with `return_state`.

        Args:
          rope: ignored.
          mask: optional [B, L] or [L], 0 for padding: padding changes no state and no other
            token's output (its own output is meaningless).
          segment_ids: optional int [B, L], one id per packed sequence (contiguous runs): no
            information flows between sequences; each starts from `initial_state`.
          initial_state: optional state dict (module doc) to continue a sequence; default zeros.
          return_state: also return the state after the last real token.
        """
        del rope
        bsz, length, width = x.shape
        if width != self.width:
            raise ValueError(f"GatedDeltaNet: input width {width} != layer width {self.width}")
        layout = token_layout(mask, segment_ids, bsz, length, "GatedDeltaNet")
        init = check_state("GatedDeltaNet", initial_state, self.state_shapes(bsz))
        x = layout.gather(x.astype(self.dtype))
        h = self.num_heads
        conv_states = {}

        def heads(y, d):
            y = y.reshape(bsz, length, h, d).transpose(0, 2, 1, 3)
            return with_logical_constraint(y, BHLD)

        def conv_silu(proj, kernel, key):
            out = layout.conv(proj(x), kernel[...], initial_state=init.get(key),
                              return_state=return_state)
            if return_state:
                out, conv_states[key] = out
            return jax.nn.silu(out)

        q = fla_l2_normalize(heads(conv_silu(self.q_proj, self.q_conv, "q_conv"), self.head_dim))
        k = fla_l2_normalize(heads(conv_silu(self.k_proj, self.k_conv, "k_conv"), self.head_dim))
        v = heads(conv_silu(self.v_proj, self.v_conv, "v_conv"), self.head_v_dim)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32)).transpose(0, 2, 1)
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = (-jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)).transpose(0, 2, 1)
        if layout.valid is not None:      # padding: decay 1, no write (docs/design.md §7)
            real = layout.valid[:, None, :]
            beta, g = jnp.where(real, beta, 0.0), jnp.where(real, g, 0.0)

        o = gated_delta_rule(q, k, v.astype(jnp.float32), g, beta, chunk_size=self.chunk_size,
                             initial_state=init.get("delta"), return_state=return_state,
                             reset=layout.reset)
        if return_state:
            o, conv_states["delta"] = o
        o = with_logical_constraint(o.transpose(0, 2, 1, 3), BLHD)
        gate = self.g_proj(x).reshape(bsz, length, h, self.head_v_dim)
        o = gated_rms_norm(o, gate.astype(jnp.float32), self.o_norm_weight[...], eps=self.norm_eps,
                           norm_before_gate=True)
        o = o.reshape(bsz, length, h * self.head_v_dim).astype(self.dtype)
        y = layout.scatter(with_logical_constraint(self.o_proj(o), BLD))
        return (y, conv_states) if return_state else y
