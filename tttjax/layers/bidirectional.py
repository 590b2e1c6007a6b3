"""The paper's gated bidirectional use of a sequence mixer (docs/design.md §2).

    Z  = X + tanh(alpha_fwd) * f(X)
    Z' = Z + tanh(alpha_bwd) * rev(f(rev(Z)))      # the same f, reversed sequence

`rev` is a token permutation: a plain flip by default, or any order given as indices (the
DiT reverses video token-wise but text segment-wise). Rotary tables travel with their tokens,
so each token keeps its own position in the reversed pass, unless `rope_reversed` gives the
reversed pass its own tables (docs/design.md §2: the seed code's rotation by slot).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.logical_params import logical_param
from tttjax.ops.rope import flip_rope

Rope = tuple[jax.Array, jax.Array]


def _permute(a: jax.Array, index: jax.Array | None, axis: int) -> jax.Array:
    return jnp.flip(a, axis=axis) if index is None else jnp.take(a, index, axis=axis)




def gated_bidirectional(fn: Callable[..., jax.Array], x: jax.Array, gate_fwd: jax.Array,
                        gate_bwd: jax.Array, *, reverse_index: jax.Array | None = None,
                        rope: Rope | None = None, rope_reversed: Rope | None = None
                        ) -> jax.Array:
    """The forward-then-reversed gated residual (docs/design.md §2).

    Args:
      fn: mixer, `fn(x [B, L, D], rope=...) -> [B, L, D]` (parameters shared by both passes).
      x: [B, L, D].
      gate_fwd, gate_bwd: pre-tanh gates broadcastable to [B, L, D] (e.g. [D] or [L, D] for
        per-token text/video gates).
      reverse_index: optional [L] int permutation giving the reversed order; default flip.
        Give a NumPy array when it is known at trace time (the DiT's layout): its inverse is
        then computed once on the host instead of by an argsort that XLA constant-folds at
        every compile (9.5 s of CPU compile time at the 63 s stage's 346k tokens).
      rope: optional (cos, sin) [L, d] or [B, L, d] for the forward order.
      rope_reversed: optional tables for the reversed pass, indexed like `rope` (by each
        token's forward position); default `rope`, i.e. every token keeps its own rotation.
    Returns:
      Z' [B, L, D] in x's dtype.
    """
    z = x + jnp.tanh(gate_fwd).astype(x.dtype) * fn(x, rope=rope)
    if reverse_index is None:
        undo = None
    elif isinstance(reverse_index, np.ndarray):
        undo = np.argsort(reverse_index).astype(reverse_index.dtype)
    else:
        undo = jnp.argsort(reverse_index)
    rope_rev = rope if rope_reversed is None else rope_reversed
    y_rev = fn(_permute(z, reverse_index, 1), rope=flip_rope(rope_rev, reverse_index))
    return z + jnp.tanh(gate_bwd).astype(x.dtype) * _permute(y_rev, undo, 1)


def _per_token(table: jax.Array, modality: jax.Array, dtype) -> jax.Array:
    """Row `modality[l]` of `table` [M, D] for every token: [L, D] in `dtype`.

    The gates are stored in param_dtype (float32 master weights) but the [L, D] per-token
    copy is activation-sized (346k x 3072 at 63 s), so it is built in the compute dtype. A
    one-hot matmul rather than a gather: the gradient (a sum over all L tokens per row)
    then accumulates in float32 inside the dot, where a gather's scatter-add would
    accumulate in bfloat16 and stall once the sum outgrows its terms.
    """
    one_hot = jax.nn.one_hot(modality, table.shape[0], dtype=dtype)
    return jnp.dot(one_hot, table.astype(dtype), precision=jax.lax.Precision.HIGHEST)


class GatedBidirectional(nnx.Module):
    """Owns a mixer and its forward/backward gates, one gate vector per token modality.

    Gates are [num_modalities, D] (the paper: text and video, init 0.1 so tanh ~ 0.0997).
    Call with `modality` [L] ints choosing each token's gate row (default: row 0 for all).
    """

    def __init__(self, mixer: nnx.Module, width: int, *, num_modalities: int = 2,
                 gate_init: float = 0.1, param_dtype=jnp.float32):
        self.mixer = mixer
        shape = (num_modalities, width)
        self.alpha_fwd = logical_param(jnp.full(shape, gate_init, param_dtype), (None, "embed"))
        self.alpha_bwd = logical_param(jnp.full(shape, gate_init, param_dtype), (None, "embed"))

    def __call__(self, x: jax.Array, *, modality: jax.Array | None = None,
                 reverse_index: jax.Array | None = None, rope: Rope | None = None,
                 rope_reversed: Rope | None = None) -> jax.Array:
        """x [B, L, D]; modality [L] int; returns [B, L, D]."""
        if modality is None:
            modality = jnp.zeros((x.shape[1],), jnp.int32)
        gate_fwd = _per_token(self.alpha_fwd[...], modality, x.dtype)   # [L, D]
        gate_bwd = _per_token(self.alpha_bwd[...], modality, x.dtype)
        return gated_bidirectional(self.mixer, x, gate_fwd, gate_bwd,
                                   reverse_index=reverse_index, rope=rope,
                                   rope_reversed=rope_reversed)
