"""Prompt dropout for classifier-free guidance (docs/design.md §4).

With probability `p` (0.1) an example's whole prompt embedding is zeroed (every segment's
prompt, all tokens), so one network learns both the conditional and the unconditional
velocity; sampling then mixes the two with the guidance scale.
"""

from __future__ import annotations

import jax


def drop_prompts(key: jax.Array, text: jax.Array, p: float) -> tuple[jax.Array, jax.Array]:
    """Zeroes each example's prompt embedding with probability `p`.

    Args:
      key: PRNG key.
      text: [B, ...] prompt embeddings (e.g. [B, n, S, Dt]).
      p: drop probability in [0, 1].
    Returns:
      (text with dropped rows zeroed, bool [B] True where kept).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prompt dropout probability must be in [0, 1], got {p}")
    keep = jax.random.uniform(key, (text.shape[0],)) >= p
    mask = keep.reshape((-1,) + (1,) * (text.ndim - 1)).astype(text.dtype)
    return text * mask, keep
