"""Initialisers shared by the recurrent baselines (mamba_ssm Mamba2, fla GatedDeltaNet).

- `dt_bias`: dt ~ exp(U(log dt_min, log dt_max)) clamped below at `floor`, stored as its
  inverse softplus, so softplus(0 + dt_bias) starts log-uniform in [dt_min, dt_max].
- `a_log`: A ~ U(low, high), stored as log A (the decay rate is -exp(A_log)); mamba_ssm
  uses (1, 16), fla's GatedDeltaNet (0, 16).
- `uniform_fan_in`: torch's default Conv1d/Linear init U(+-1/sqrt(fan_in)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dt_bias(key: jax.Array, shape, *, dt_min: float = 1e-3, dt_max: float = 0.1,
            floor: float = 1e-4, dtype=jnp.float32) -> jax.Array:
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt init: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse of softplus


def a_log(key: jax.Array, shape, *, low: float = 1.0, high: float = 16.0,
          dtype=jnp.float32) -> jax.Array:
    if not 0 <= low < high:
        raise ValueError(f"A init: need 0 <= low < high, got ({low}, {high})")
    a = jax.random.uniform(key, shape, jnp.float32, minval=low, maxval=high)
    # A = 0 has no log; U(0, 16) draws it with probability ~0 but clamp anyway.
    return jnp.log(jnp.maximum(a, 1e-4)).astype(dtype)


def uniform_fan_in(key: jax.Array, shape, fan_in: int, dtype=jnp.float32) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
