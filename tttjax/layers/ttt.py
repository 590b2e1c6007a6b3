"""TTT-Linear and TTT-MLP as Flax NNX sequence mixers (docs/design.md §1).

Each layer owns every outer parameter of the published layer: the q/k/v/o projections,
the per-head learning-rate gate, the TTT LayerNorm, the initial inner state and the
post-norm. The inner loop itself is the pure function in `tttjax.ops.ttt`.

Call: `layer(x [B, L, D], *, rope=None) -> [B, L, D]`, the interface shared by every mixer
of `tttjax.layers.registry`. Any L is accepted: the layer pads the sequence at the end to a
multiple of the mini-batch with tokens whose step size is zero (they never change the inner
state, so real tokens are unaffected up to the last mini-batch's 1/b normalisation) and
slices the padding off again.

With `context_axis` (a mesh axis name) the inner loop runs context-parallel
(`tttjax.ops.ttt_context_parallel`): each device of that axis scans its own span of the
sequence and only the inner state moves between devices. The layer then pads L to a multiple
of (axis size x mini-batch) and must be called under `jax.set_mesh` with a mesh holding that
axis; batch and heads keep the mesh axes the logical rules give them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from tttjax import sharding
from tttjax.logical_params import logical_init, logical_param
from tttjax.ops import ttt as ttt_ops
from tttjax.ops.rope import apply_rope
from tttjax.ops.ttt_context_parallel import ttt_context_parallel
from tttjax.sharding import BLD, with_logical_constraint

_INIT_STD = 0.02

# The TTT layers' defaults (docs/design.md §1), one home: the layer classes and the mixer
# registry read them from here.
DEFAULTS = {
    "mlp": dict(mini_batch_size=64, base_lr=0.1, remat_group_size=16),
    "linear": dict(mini_batch_size=16, base_lr=1.0, remat_group_size=16),
}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, in float32 (torch F.normalize semantics)."""
    xf = x.astype(jnp.float32)
    # rsqrt of the clamped square keeps the gradient finite at x = 0 (padding tokens).
    sq = jnp.sum(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def init_param(rngs: nnx.Rngs, kind: str, shape, names, dtype) -> nnx.Param:
    """A parameter initialised as docs/design.md §1 and §3 say: "normal" N(0, 0.02), "ones" or
    "zeros", annotated with logical axis `names` (the TTT layers' and the DiT's one helper)."""
    if kind == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif kind == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return logical_param(value, names)


def _real_token_ids(segment_ids, mask, batch, length, padded):
    """[B, padded] ids in which every padding token (mask 0, and the layer's own padding at the
    end) carries the id of the real token before it (the first real token's, before any), so
    sequences start only where a real token's id changes."""
    ids = jnp.broadcast_to(jnp.asarray(segment_ids), (batch, length))
    ids = jnp.pad(ids, ((0, 0), (0, padded - length)), mode="edge")
    if mask is None:
        return ids
    real = jnp.broadcast_to(jnp.asarray(mask) != 0, (batch, length))
    real = jnp.pad(real, ((0, 0), (0, padded - length)))
    pos = jnp.where(real, jnp.arange(padded), -1)
    last = jax.lax.cummax(pos, axis=1)                            # last real token so far
    first = jnp.argmax(real, axis=1)[:, None]
    return jnp.take_along_axis(ids, jnp.where(last < 0, first, last), axis=1)


class _TTTLayer(nnx.Module):
    kind: str = ""

    def __init__(self, width: int, num_heads: int, *, mini_batch_size: int | None = None,
                 base_lr: float | None = None, remat_group_size: int | None = None, causal: bool = False, impl: str = "xla",
                 context_axis: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        name = type(self).__name__
        defaults = DEFAULTS[self.kind]  # None: the kind's default
        mini_batch_size = defaults["mini_batch_size"] if mini_batch_size is None else mini_batch_size
        base_lr = defaults["base_lr"] if base_lr is None else base_lr
        remat_group_size = defaults["remat_group_size"] if remat_group_size is None else remat_group_size
        if width % num_heads:
            raise ValueError(f"{name}: width {width} must be divisible by num_heads {num_heads}")
        if mini_batch_size < 1 or remat_group_size < 1:
            raise ValueError(f"{name}: mini_batch_size and remat_group_size must be >= 1")
        self.width, self.num_heads = width, num_heads
        self.head_dim = d = width // num_heads
        self.mini_batch_size, self.base_lr = mini_batch_size, float(base_lr)
        self.remat_group_size, self.causal = remat_group_size, causal
        ttt_ops.check_impl(name, impl)
        self.impl = impl  # "xla" scan, "pallas" kernel, or "auto" (kernel where supported)
        # Mesh axis sharding the scan over L, or None ("" too: how a config spells none).
        self.context_axis = context_axis or None
        self.dtype = dtype
        h = num_heads

        normal = nnx.initializers.normal(_INIT_STD)

        def linear(names):
            return nnx.Linear(width, width, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=logical_init(normal, names),
                              bias_init=logical_init(nnx.initializers.zeros, names[1:]),
                              rngs=rngs)

        self.wq, self.wk, self.wv = (linear(("embed", "heads")) for _ in range(3))
        self.wo = linear(("heads", "embed"))
        self.theta_lr = init_param(rngs, "normal", (h, width), ("heads", "embed"), param_dtype)
        self.b_lr = init_param(rngs, "zeros", (h,), ("heads",), param_dtype)
        self.ln_weight = init_param(rngs, "ones", (h, d), ("heads", "kv"), param_dtype)
        self.ln_bias = init_param(rngs, "zeros", (h, d), ("heads", "kv"), param_dtype)
        f = 4 * d if self.kind == "mlp" else d
        self.W1 = init_param(rngs, "normal", (h, d, f), ("heads", "kv", "ttt_hidden"), param_dtype)
        self.b1 = init_param(rngs, "zeros", (h, 1, f), ("heads", None, "ttt_hidden"), param_dtype)
        if self.kind == "mlp":
            self.W2 = init_param(rngs, "normal", (h, f, d), ("heads", "ttt_hidden", "kv"),
                                 param_dtype)
            self.b2 = init_param(rngs, "zeros", (h, 1, d), ("heads", None, "kv"), param_dtype)
        if causal:
            # ttt-lm's learnable offset of the 1/j step-size scale, initialised at zero.
            self.token_idx_offset = init_param(rngs, "zeros", (mini_batch_size,), (None,),
                                               param_dtype)
        self.post_norm = nnx.LayerNorm(
            width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
            scale_init=logical_init(nnx.initializers.ones, ("norm",)),
            bias_init=logical_init(nnx.initializers.zeros, ("norm",)), rngs=rngs)

    def inner_params(self) -> dict[str, jax.Array]:
        """The op's params dict (initial inner state + TTT LayerNorm), float32."""
        keys = ttt_ops.PARAM_SHAPES[self.kind]
        return {key: getattr(self, key)[...].astype(jnp.float32) for key in keys}

    def _context_parallel_op(self, batch: int):
        """`ttt_context_parallel` over `context_axis` with ttt_mlp's signature, and its size."""
        name = type(self).__name__
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or self.context_axis not in mesh.shape:
            axes = () if mesh is None or mesh.empty else tuple(mesh.axis_names)
            raise ValueError(f"{name}: context_axis={self.context_axis!r} needs a mesh with that "
                             f"axis set by jax.set_mesh; the current mesh axes are {axes}")
        rules = core_spmd.get_logical_axis_rules() or sharding.DEFAULT_RULES
        # shard_map needs even shards: axes that do not divide B or H are dropped.
        spec = sharding._prune_spec(
            sharding.logical_to_spec(("activation_batch", "activation_heads"), rules), mesh,
            (batch, self.num_heads))
        batch_axes, head_axes = (
            tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a and a != self.context_axis)
            for e in tuple(spec) + (None,) * (2 - len(spec)))
        op = functools.partial(ttt_context_parallel, self.kind, axis_name=self.context_axis,
                               mesh=mesh, batch_axes=batch_axes, head_axes=head_axes)
        return op, mesh.shape[self.context_axis]

    def _heads(self, y, batch, length):
        y = y.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        # Context-parallel: keep every head of the local span (the scan's layout), rather than
        # heads over `tensor`, which would take an all-to-all into and out of the scan.
        heads = None if self.context_axis else "activation_heads"
        return with_logical_constraint(
            y, ("activation_batch", heads, "activation_length", "activation_kv"))

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
                 mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 initial_state: dict[str, jax.Array] | None = None, return_state: bool = False):
        """x [B, L, D] -> y [B, L, D], or (y, final inner state) with `return_state`.

        Args:
          x: [B, L, D] tokens.
          rope: optional (cos, sin), each [L, d] or [B, L, d].
          mask: optional [B, L] or [L] (bool or 0/1): tokens where it is 0 (padding) take no
            inner-loop step, so they change neither the state nor other tokens' outputs (each
            mini-batch's step is still divided by the mini-batch size b, as for the padding
            the layer adds itself). Their own outputs are computed but meaningless.
          segment_ids: optional [B, L] (or [L]) int, one id per packed sequence: a sequence
            starts where the id differs from the previous real (mask != 0) token's, and there
            the inner state resets to the initial state, so no information flows between
            sequences. Each start must fall on a multiple of mini_batch_size: pad every packed
            sequence to a multiple of b tokens with mask=0 (those tokens may carry any id).
            Runs in the XLA scan (impl="auto" uses it; impl="pallas" raises); not with
            context_axis.
          initial_state: optional inner state to start from, a dict W1, b1 (and W2, b2 for
            TTT-MLP) of float32 [B, H, ...] (the `state` a previous call returned), to continue
            a sequence processed in pieces; default the learned initial state.
          return_state: also return the final inner state (same dict, float32 [B, H, ...]).
        """
        batch, length, width = x.shape
        name = type(self).__name__
        if width != self.width:
            raise ValueError(f"{name}: input width {width} != layer width {self.width}")
        if mask is not None and jnp.shape(mask) not in ((length,), (batch, length)):
            raise ValueError(f"{name}: mask must be [L] or [B, L] = {(batch, length)}, got "
                             f"{tuple(jnp.shape(mask))}")
        if segment_ids is not None and jnp.shape(segment_ids) not in ((length,), (batch, length)):
            raise ValueError(f"{name}: segment_ids must be [B, L] = {(batch, length)} (or [L]), "
                             f"got {tuple(jnp.shape(segment_ids))}")
        if self.context_axis is not None and (initial_state is not None or return_state
                                              or segment_ids is not None):
            raise ValueError(f"{name}: initial_state / return_state / segment_ids are not "
                             "supported with context_axis (the context-parallel scan keeps its "
                             "state local); use context_axis=None")
        b = self.mini_batch_size
        pad_unit = b
        if self.context_axis is not None:
            context_op, context_size = self._context_parallel_op(batch)
            pad_unit = context_size * b  # every device's span is whole mini-batches
        padded = -(-length // pad_unit) * pad_unit
        if padded != length:
            x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))
            if rope is not None:
                pad = ((0, 0),) * (rope[0].ndim - 2) + ((0, padded - length), (0, 0))
                rope = (jnp.pad(rope[0], pad, constant_values=1.0), jnp.pad(rope[1], pad))
        x = x.astype(self.dtype)

        q = l2_normalize(self._heads(self.wq(x), batch, padded))
        k = l2_normalize(self._heads(self.wk(x), batch, padded))
        v = self._heads(self.wv(x), batch, padded)
        if rope is not None:
            cos, sin = rope
            if cos.ndim == 3:  # per-example tables [B, L, d] -> broadcast over heads
                cos, sin = cos[:, None], sin[:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # bf16 operands, float32 accumulation: a float32 copy of x here would make its
        # gradient a float32 [B, L, D] buffer (4 GiB per example at 63 s).
        gate = jnp.einsum("bld,hd->bhl", x, self.theta_lr[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
        eta = self.base_lr * jax.nn.sigmoid(gate + self.b_lr[...].astype(jnp.float32)[:, None]) / self.head_dim
        if padded != length:
            eta = eta * (jnp.arange(padded) < length).astype(jnp.float32)
        if mask is not None:
            keep = jnp.broadcast_to(jnp.asarray(mask), (batch, length)).astype(jnp.float32)
            eta = eta * jnp.pad(keep, ((0, 0), (0, padded - length)))[:, None, :]

        op = ttt_ops.ttt_mlp if self.kind == "mlp" else ttt_ops.ttt_linear
        if self.context_axis is not None:
            op = context_op
        offset = self.token_idx_offset[...] if self.causal else None
        state_args = {} if self.context_axis is not None else dict(
            initial_state=initial_state, return_state=return_state)
        if segment_ids is not None:
            state_args["segment_ids"] = _real_token_ids(segment_ids, mask, batch, length, padded)
        z = op(q, k, v, eta, self.inner_params(), mini_batch_size=b,
               remat_group_size=self.remat_group_size, causal=self.causal, token_idx_offset=offset,
               impl=self.impl, **state_args)
        z, state = z if return_state else (z, None)
        z = z.transpose(0, 2, 1, 3).reshape(batch, padded, width)[:, :length]
        z = with_logical_constraint(z, BLD)
        y = self.wo(self.post_norm(z))
        return (y, state) if return_state else y


class TTTMLP(_TTTLayer):
    """TTT-MLP mixer: inner net GELU_tanh(x W1 + b1) W2 + b2; defaults b = 64, base_lr = 0.1
    (`DEFAULTS["mlp"]`)."""

    kind = "mlp"


class TTTLinear(_TTTLayer):
    """TTT-Linear mixer: inner net x W1 + b1; defaults b = 16, base_lr = 1.0
    (`DEFAULTS["linear"]`)."""

    kind = "linear"
