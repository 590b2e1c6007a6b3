"""Training timesteps: uniform over [0, N), stratified over the global batch (docs/design.md §4).

A global batch of `B` rows takes exactly one timestep from each of `B` equal strata of
`[0, N)`, the strata dealt to the rows in a random order:

    t_r = floor((perm[r] + u_r) * N / B),   perm a random permutation of 0..B-1, u_r ~ U[0, 1)

Each `t_r` is uniform on `[0, N)` (marginally), and every batch covers the noise levels
evenly, so whichever rows a data-parallel group holds, the groups together never all draw
from the same end of the schedule (lower variance of the loss and of its gradient than
i.i.d. draws). The draw depends only on the key and `B`, never on how the batch is sharded,
so any mesh or number of hosts sees the same timesteps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stratified_timesteps(key: jax.Array, batch_size: int, num_timesteps: int = 1000) -> jax.Array:
    """int32 [batch_size] timesteps in [0, num_timesteps), one per stratum (see module doc)."""
    if batch_size < 1 or num_timesteps < 1:
        raise ValueError(f"need batch_size >= 1 and num_timesteps >= 1, got {batch_size}, "
                         f"{num_timesteps}")
    k_perm, k_u = jax.random.split(key)
    strata = jax.random.permutation(k_perm, batch_size).astype(jnp.float32)
    u = jax.random.uniform(k_u, (batch_size,), jnp.float32)
    t = jnp.floor((strata + u) * (num_timesteps / batch_size)).astype(jnp.int32)
    return jnp.clip(t, 0, num_timesteps - 1)
