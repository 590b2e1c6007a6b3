"""Short depthwise causal convolution (the width-4 convs of Mamba 2 and Gated DeltaNet).

    y[t, c] = bias[c] + sum_j kernel[j, c] * x[t - K + 1 + j, c]      (x[s] = 0 for s < 0)

which is torch's `Conv1d(C, C, K, groups=C, padding=K - 1)(x)[..., :L]` with
`kernel[j, c] = weight[c, 0, j]`. Written as K shifted multiply-adds: no convolution
primitive, so it shards along channels and fuses with its neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None
                          ) -> jax.Array:
    """x [B, L, C], kernel [K, C], bias [C] or None -> [B, L, C] in x's dtype."""
    if x.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != x.shape[2]:
        raise ValueError(f"causal_depthwise_conv: need x [B, L, C] and kernel [K, C] with the same "
                         f"C, got {x.shape} and {kernel.shape}")
    width, length = kernel.shape[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    kernel = kernel.astype(x.dtype)
    y = sum(xp[:, j:j + length] * kernel[j] for j in range(width))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y
