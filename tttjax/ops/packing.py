"""Padded and packed token batches for the sequence mixers: the per-token `mask` and
`segment_ids` arguments turned into what the chunked ops take.

    layout = token_layout(mask, segment_ids, batch, length, "GatedDeltaNet")
    x = layout.gather(x)           # real tokens first, in order; padding moved to the end
    ... layout.reset, layout.segment_start, layout.valid, layout.num_tokens ...
    y = layout.scatter(y)          # back to the caller's token order

`mask` ([B, L] or [L], 0 = padding) and `segment_ids` ([B, L] int, one id per packed sequence;
a sequence is a contiguous run of equal ids) follow `TTTMLP.__call__`. Moving the real
tokens to the front (a stable sort per row) makes every causal piece of a mixer (short
convolutions, recurrences, windows) see exactly the unpadded sequence, wherever the padding
was; padding then only needs to leave the final state alone (a skip step: beta = 0, g = 0 in
the delta rule, dt = 0 in SSD). Segments are the runs of equal ids among the real tokens:
a new run starts where the id differs from the previous real token's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tttjax.ops.causal_conv import causal_depthwise_conv


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the real tokens and packed sequences are, in the compacted order."""

    order: jax.Array | None          # int [B, L]: compacted position -> caller position; None: as is
    valid: jax.Array | None          # bool [B, L] (compacted): False for padding; None: all real
    # without segment_ids the next three are None (one sequence per row)
    reset: jax.Array | None          # bool [B, L] (compacted): a new packed sequence starts here
    segment: jax.Array | None        # int [B, L] (compacted): run index of each token (padding:
                                     # the last real token's)
    segment_start: jax.Array | None  # int [B, L] (compacted): first position of each token's run
    num_tokens: jax.Array | None     # int [B]: real tokens per row

    def gather(self, a: jax.Array, axis: int = 1) -> jax.Array:
        """a [B, L, ...] (or [L, ...] with axis 0: broadcast to the batch) in compacted order."""
        if self.order is None:
            return a
        if axis == 0:
            a, axis = jnp.broadcast_to(a, (self.order.shape[0],) + a.shape), 1
        index = self.order.reshape(self.order.shape + (1,) * (a.ndim - 2))
        return jnp.take_along_axis(a, index, axis=axis)

    def conv(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
             initial_state: jax.Array | None = None, return_state: bool = False):
        """`causal_depthwise_conv` of compacted x [B, L, C] that restarts at every packed
        sequence and hands its state on after the last real token: y, or (y, float32 state)."""
        out = causal_depthwise_conv(x, kernel, bias, initial_state=initial_state,
                                    segment_start=self.segment_start, num_tokens=self.num_tokens,
                                    return_state=return_state)
        return (out[0], out[1].astype(jnp.float32)) if return_state else out

    def scatter(self, a: jax.Array) -> jax.Array:
        """a [B, L, ...] in compacted order -> the caller's token order."""
        if self.order is None:
            return a
        inverse = jnp.argsort(self.order, axis=1)
        return jnp.take_along_axis(a, inverse.reshape(inverse.shape + (1,) * (a.ndim - 2)), axis=1)


def check_token_args(name: str, batch: int, length: int, mask, segment_ids) -> None:
    """Raises ValueError (one line, naming `name`) for a mask / segment_ids of the wrong shape."""
    if mask is not None and jnp.shape(mask) not in ((length,), (batch, length)):
        raise ValueError(f"{name}: mask must be [L] or [B, L] = {(batch, length)}, got "
                         f"{tuple(jnp.shape(mask))}")
    if segment_ids is not None:
        if jnp.shape(segment_ids) not in ((length,), (batch, length)):
            raise ValueError(f"{name}: segment_ids must be [B, L] = {(batch, length)}, got "
                             f"{tuple(jnp.shape(segment_ids))}")
        if not jnp.issubdtype(jnp.asarray(segment_ids).dtype, jnp.integer):
            raise ValueError(f"{name}: segment_ids must be integers (one id per packed "
                             f"sequence), got {jnp.asarray(segment_ids).dtype}")


def token_layout(mask, segment_ids, batch: int, length: int, name: str) -> TokenLayout:
    """The `TokenLayout` of a [B, L] batch; all fields None when both arguments are None."""
    check_token_args(name, batch, length, mask, segment_ids)
    if mask is None and segment_ids is None:
        return TokenLayout(None, None, None, None, None, None)
    order = valid = None
    if mask is not None:
        valid = jnp.broadcast_to(jnp.asarray(mask) != 0, (batch, length))
        order = jnp.argsort(~valid, axis=1, stable=True)
        valid = jnp.take_along_axis(valid, order, axis=1)
        num_tokens = jnp.sum(valid, axis=1)
    else:
        num_tokens = jnp.full((batch,), length)
    if segment_ids is None:
        return TokenLayout(order, valid, None, None, None, num_tokens)
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    ids = jnp.broadcast_to(jnp.asarray(segment_ids), (batch, length))
    if order is not None:
        ids = jnp.take_along_axis(ids, order, axis=1)
    # compacted: a real token's predecessor is real, so comparing neighbours suffices
    reset = jnp.pad(ids[:, 1:] != ids[:, :-1], ((0, 0), (1, 0)))
    if valid is not None:
        reset = reset & valid
    segment = jnp.cumsum(reset, axis=1)
    segment_start = jax.lax.cummax(jnp.where(reset, pos, 0), axis=1)
    return TokenLayout(order, valid, reset, segment, segment_start, num_tokens)


def check_state(name: str, state, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """A recurrent mixer's `initial_state` dict checked against {key: shape}; {} for None."""
    if state is None:
        return {}
    if not hasattr(state, "keys") or set(state.keys()) != set(shapes):
        got = sorted(state.keys()) if hasattr(state, "keys") else type(state).__name__
        raise ValueError(f"{name}: initial_state must be the dict a call with return_state=True "
                         f"returned, with keys {sorted(shapes)}; got {got}")
    for key, shape in shapes.items():
        if tuple(jnp.shape(state[key])) != tuple(shape):
            raise ValueError(f"{name}: initial_state[{key!r}] must be {list(shape)}, got "
                             f"{list(jnp.shape(state[key]))}")
    return {key: jnp.asarray(state[key], jnp.float32) for key in shapes}
