"""Mamba 2 sequence mixer (docs/design.md §7; mamba_ssm's `Mamba2` block).

    z, xs, (B, C), dt_raw = in_proj(x)                   d_inner = expand * D
    xs, B, C = SiLU(causal_conv4([xs, B, C]))            depthwise, with bias
    dt = softplus(dt_raw + dt_bias),  A = -exp(A_log)    per head
    y  = ssd(xs, dt, A, B, C) + D * xs                   (tttjax.ops.ssd)
    out = out_proj(RMSNorm(y * SiLU(z)) * weight)        norm over each group's d_inner / G channels

mamba_ssm's single `in_proj` (columns z | x | B | C | dt) and single conv over x|B|C are
stored here as separate kernels (`z_proj, x_proj, bc_proj, dt_proj`; `x_conv, bc_conv`):
the same function, but each piece carries its own sharding (head-sharded z/x/dt, replicated
B/C). Defaults as mamba_ssm: expand 2, d_state 128, 1 group, conv width 4, chunk 256,
A ~ U(1, 16) stored as log, dt_bias = softplus^-1 of log-uniform dt in [1e-3, 0.1] (floor
1e-4), D = 1, conv init U(+-1/sqrt(4)). Linear layers are N(0, 0.02) without bias.
Heads: `head_dim` defaults to `width / num_heads` (64 at the DiT's 48 x 64 shape, mamba_ssm's
default); the layer then has `expand * width / head_dim` heads (96 for CogVideoX-5B).

Causal in time; `tttjax.layers.registry` adds the reversed pass for the bidirectional
setting. RoPE is not used (the `rope` argument is accepted and ignored).

Padded and packed batches, and sequences in pieces (the keywords of `TTTMLP.__call__`):
`mask` (0 = padding: the real tokens are moved to the front, `tttjax.ops.packing`, and
padding takes a skip step dt = 0), `segment_ids` (the SSM state and the short convolutions
restart from the initial state at every packed sequence), `initial_state` / `return_state`
(the state is {"ssm": h [B, H, P, N], "x_conv": [B, K - 1, d_inner], "bc_conv": [B, K - 1,
2 G N]}, the convolutions' last K - 1 inputs before their bias; all float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tttjax.layers import ssm_init
from tttjax.logical_params import logical_init, logical_param
from tttjax.ops.gated_rms_norm import gated_rms_norm
from tttjax.ops.packing import check_state, token_layout
from tttjax.ops.ssd import ssd
from tttjax.sharding import BHLD, BLD, BLHD, with_logical_constraint

_INIT_STD = 0.02


def _linear(d_in, d_out, names, *, dtype, param_dtype, rngs):
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=logical_init(nnx.initializers.normal(_INIT_STD), names),
                      rngs=rngs)


class Mamba2(nnx.Module):
    """Mamba 2 mixer: `layer(x [B, L, D], *, rope=None) -> [B, L, D]`."""

    def __init__(self, width: int, num_heads: int, *, d_state: int = 128, expand: int = 2,
                 head_dim: int | None = None, ngroups: int = 1, conv_size: int = 4,
                 chunk_size: int = 256, norm_eps: float = 1e-5,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if head_dim is None:
            if width % num_heads:
                raise ValueError(f"Mamba2: width {width} must be divisible by num_heads {num_heads} "
                                 "(or give head_dim)")
            head_dim = width // num_heads
        d_inner = expand * width
        if d_inner % head_dim:
            raise ValueError(f"Mamba2: expand * width = {d_inner} must be a multiple of head_dim "
                             f"{head_dim}")
        nheads = d_inner // head_dim
        if nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups {ngroups} must divide the number of heads {nheads}")
        if min(d_state, conv_size, chunk_size, ngroups) < 1:
            raise ValueError("Mamba2: d_state, conv_size, chunk_size and ngroups must be >= 1")
        self.width, self.num_heads, self.head_dim = width, nheads, head_dim
        self.d_inner, self.d_state, self.ngroups = d_inner, d_state, ngroups
        self.chunk_size, self.norm_eps, self.dtype = chunk_size, norm_eps, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bc_dim = 2 * ngroups * d_state
        self.z_proj = _linear(width, d_inner, ("embed", "heads"), **kw)
        self.x_proj = _linear(width, d_inner, ("embed", "heads"), **kw)
        self.bc_proj = _linear(width, bc_dim, ("embed", "state"), **kw)
        self.dt_proj = _linear(width, nheads, ("embed", "heads"), **kw)
        self.out_proj = _linear(d_inner, width, ("heads", "embed"), **kw)

        def conv(channels, axis):
            kernel = ssm_init.uniform_fan_in(rngs.params(), (conv_size, channels), conv_size, param_dtype)
            bias = ssm_init.uniform_fan_in(rngs.params(), (channels,), conv_size, param_dtype)
            return (logical_param(kernel, ("conv", axis)),
                    logical_param(bias, (axis,)))

        self.x_conv, self.x_conv_bias = conv(d_inner, "heads")
        self.bc_conv, self.bc_conv_bias = conv(bc_dim, "state")
        self.A_log = logical_param(
            ssm_init.a_log(rngs.params(), (nheads,), low=1.0, high=16.0, dtype=param_dtype),
            ("heads",))
        self.dt_bias = logical_param(
            ssm_init.dt_bias(rngs.params(), (nheads,), dtype=param_dtype), ("heads",))
        self.D = logical_param(jnp.ones((nheads,), param_dtype), ("heads",))
        self.norm_weight = logical_param(jnp.ones((nheads, head_dim), param_dtype), ("heads", "kv"))

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the `initial_state` / returned state dict for a batch of `batch` rows."""
        k = self.x_conv.shape[0] - 1
        return {"ssm": (batch, self.num_heads, self.head_dim, self.d_state),
                "x_conv": (batch, k, self.d_inner),
                "bc_conv": (batch, k, 2 * self.ngroups * self.d_state)}

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
                 mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 initial_state: dict[str, jax.Array] | None = None, return_state: bool = False):
        """x [B, L, D] -> y [B, L, D], or (y, final state) with `return_state`; the keywords
        as `GatedDeltaNet.__call__` (state dict: the module doc)."""
        del rope
        bsz, length, width = x.shape
        if width != self.width:
            raise ValueError(f"Mamba2: input width {width} != layer width {self.width}")
        layout = token_layout(mask, segment_ids, bsz, length, "Mamba2")
        init = check_state("Mamba2", initial_state, self.state_shapes(bsz))
        x = layout.gather(x.astype(self.dtype))
        h, p, g, n = self.num_heads, self.head_dim, self.ngroups, self.d_state
        states = {}

        def conv_silu(proj, kernel, bias, key):
            out = layout.conv(proj(x), kernel[...], bias[...], initial_state=init.get(key),
                              return_state=return_state)
            if return_state:
                out, states[key] = out
            return jax.nn.silu(out)

        xs = conv_silu(self.x_proj, self.x_conv, self.x_conv_bias, "x_conv")
        bc = conv_silu(self.bc_proj, self.bc_conv, self.bc_conv_bias, "bc_conv")
        xs = with_logical_constraint(xs.reshape(bsz, length, h, p).transpose(0, 2, 1, 3),
                                     BHLD)
        bc = bc.reshape(bsz, length, 2, g, n).transpose(2, 0, 3, 1, 4)   # [2, B, G, L, N]
        dt = jax.nn.softplus(self.dt_proj(x).astype(jnp.float32)
                             + self.dt_bias[...].astype(jnp.float32)).transpose(0, 2, 1)
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        if layout.valid is not None:      # padding: decay 1, no input (docs/design.md §7)
            dt = jnp.where(layout.valid[:, None, :], dt, 0.0)

        y = ssd(xs.astype(jnp.float32), dt, a, bc[0], bc[1], chunk_size=self.chunk_size,
                initial_state=init.get("ssm"), return_state=return_state, reset=layout.reset)
        if return_state:
            y, states["ssm"] = y
        y = y + self.D[...].astype(jnp.float32)[:, None, None] * xs.astype(jnp.float32)
        y = with_logical_constraint(y.transpose(0, 2, 1, 3), BLHD)
        z = self.z_proj(x).reshape(bsz, length, h, p)
        # Normalisation groups span h / G whole heads: flatten them into the last axis.
        group = lambda a: a.reshape(bsz, length, g, (h // g) * p)  # noqa: E731
        y = gated_rms_norm(group(y), group(z.astype(jnp.float32)),
                           self.norm_weight[...].reshape(g, (h // g) * p),
                           eps=self.norm_eps, norm_before_gate=False)
        y = y.reshape(bsz, length, self.d_inner).astype(self.dtype)
        y = layout.scatter(with_logical_constraint(self.out_proj(y), BLD))
        return (y, states) if return_state else y
