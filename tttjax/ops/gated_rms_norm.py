"""Gated RMSNorm of Gated DeltaNet (fla's FusedRMSNormGated) and Mamba 2 (RMSNormGated).

    norm_before_gate=True  (Gated DeltaNet):  RMSNorm(x) * weight * SiLU(z)
    norm_before_gate=False (Mamba 2):         RMSNorm(x * SiLU(z)) * weight

RMSNorm(a) = a / sqrt(mean(a^2) + eps) over the last axis (callers reshape so that the
last axis is the normalisation group). Computed in float32, returned in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gated_rms_norm(x: jax.Array, z: jax.Array, weight: jax.Array, *, eps: float = 1e-5,
                   norm_before_gate: bool = True) -> jax.Array:
    """x, z [..., G]; weight broadcastable to [..., G] -> [..., G] in x's dtype."""
    if x.shape != z.shape:
        raise ValueError(f"gated_rms_norm: x and gate z must have the same shape, got {x.shape} "
                         f"and {z.shape}")
    xf, zf = x.astype(jnp.float32), z.astype(jnp.float32)
    gate = jax.nn.silu(zf)
    if not norm_before_gate:
        xf = xf * gate
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = y * weight.astype(jnp.float32)
    if norm_before_gate:
        y = y * gate
    return y.astype(x.dtype)
