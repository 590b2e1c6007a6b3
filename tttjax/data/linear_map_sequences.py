"""Synthetic in-context regression sequences for probing TTT layers.

Every value is `v_t = k_t + f(k_t)` for one random linear map `f` per head (a product of two
random matrices) shared by all tokens, so the target `v - k` of a TTT layer's
reconstruction loss is learnable from context: the inner loss on each new mini-batch,
measured before the state is updated on it, falls as the inner network learns `f`.
Keys and queries are random unit vectors (no learned projections), so the inner loop needs a
much larger base learning rate than the paper's video layers (e.g. eta = 4 per token).
Used by `notebooks/explore_ttt_layers.ipynb`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def synthetic_sequence(key: jax.Array, heads: int, length: int, d: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v), each float32 [1, heads, length, d]: unit-norm q and k, v = k + f(k)."""
    kk, kq, k1, k2 = jax.random.split(key, 4)

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    k = unit(jax.random.normal(kk, (1, heads, length, d)))
    q = unit(jax.random.normal(kq, (1, heads, length, d)))
    a = jax.random.normal(k1, (heads, d, 2 * d)) / jnp.sqrt(d)
    b = jax.random.normal(k2, (heads, 2 * d, d)) / jnp.sqrt(2 * d)
    v = k + jnp.einsum("hlf,hfd->hld", jnp.einsum("hld,hdf->hlf", k[0], a), b)[None]
    return q, k, v
