"""Fused Pallas TTT-MLP / TTT-Linear scans (non-causal), differentiable through `jax.custom_vjp`.

Same contract as `tttjax.ops.ttt.ttt_mlp` / `ttt_linear`, which validate the arguments, check
`impl` and dispatch here (`select`, then `ttt_scan`) with `impl="pallas" | "auto" |
"pallas_interpret"`: z = the TTT layer's inner-loop output before post_norm and wo, in q's
dtype, inner state and arithmetic float32. This module depends only downward (the kernels, the
shared math of `ttt_step`, and tttjax's platform and sharding helpers), never on the op.

What runs where:
- plain JAX (so autodiff covers it): eta / b, broadcasting the initial state over the batch;
  for the GPU kernel also casting to float32, the normalised reconstruction target y of v - k
  and padding the sequence to whole remat groups (padded tokens have eta = 0, which leaves the
  state exactly unchanged);
- the kernels (`ttt_tpu` on TPU, `ttt_gpu` on GPU): the sequential scan, forward and backward,
  with the state on chip and one checkpoint per remat group. The TPU kernels also take q, k,
  v unpadded in their own dtype and form y (and its VJP) in VMEM, so no float32 token array
  goes through HBM (`ttt_tpu`'s docstring).

Causal (ttt-lm) form, the inner-loss diagnostics and packed sequences (`segment_ids`, state
resets) are not in the kernels: they run in the XLA op (`impl="auto"` falls back to it;
`impl="pallas"` raises).

Under a mesh (`jax.set_mesh(mesh)`, as the trainer, sampler and AOT plans run): XLA's SPMD
partitioner cannot split a `pallas_call` (an opaque custom call), so `ttt_scan` runs the kernel
inside `jax.shard_map` over the mesh axes that the logical rules give the batch and heads dims
(`mesh_layout`); every device scans whole sequences of its batch/heads shard. A mesh axis that
shards the sequence ("activation_length") and is not used by batch or heads is gathered at the
shard_map's boundary (the scan is sequential), and axes named by no dim replicate the work.

Which kernel `impl="auto"` picks follows the platform the program is compiled for
(`tttjax.platform.target_platform`): the devices of the mesh set with `jax.set_mesh`, else
`jax.default_backend()`. So a program lowered ahead of time on a CPU host for a TPU topology
mesh (`tttjax.tpu_topology`) gets the Mosaic kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

from pallas_kernels import ttt_gpu, ttt_step, ttt_tpu
from tttjax import platform as platform_lib
from tttjax import sharding as sharding_lib

BACKENDS = {"tpu": ttt_tpu, "gpu": ttt_gpu}
_PLATFORM_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def check_supported(kind: str, backend: str, *, d: int, mini_batch_size: int, remat_group_size: int):
    """Raises ValueError if `backend`'s kernel cannot run this shape (remat_group_size: effective)."""
    if kind not in ttt_step.STATE_NAMES:
        raise ValueError(f"pallas TTT kernel: kind must be 'mlp' or 'linear', got {kind!r}")
    if backend not in BACKENDS:
        raise ValueError(f"pallas TTT kernel: backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    BACKENDS[backend].check_supported(kind, d, mini_batch_size, remat_group_size)


def select(kind, impl, *, d, length, mini_batch_size, remat_group_size, causal=False,
           return_inner_loss=False, token_idx_offset=None, segment_ids=False):
    """Which kernel `impl` asks for at this shape: (backend, interpret), or None for the XLA op.

    "xla": None. "auto": the kernel of the target platform (`tttjax.platform.target_platform`:
    the platform of the mesh set with `jax.set_mesh`, else the default backend; TPU or GPU)
    when it supports the shape and options, else None. "pallas": that kernel or a ValueError
    saying why not. "pallas_interpret": the TPU kernel in Pallas' TPU interpret mode (any
    platform; slow, for tests). `impl` is one of `tttjax.ops.ttt.IMPLS` (checked there).
    """
    if impl == "xla":
        return None
    explicit = impl != "auto"
    unsupported = ("causal=True" if causal else "return_inner_loss=True" if return_inner_loss
                   else "token_idx_offset" if token_idx_offset is not None
                   else "segment_ids (state resets)" if segment_ids else None)
    if unsupported:
        if explicit:
            raise ValueError(f"ttt_{kind}: the Pallas kernels implement the non-causal scan only; "
                             f"{unsupported} runs in the XLA op: use impl='xla' or impl='auto'")
        return None
    if impl == "pallas_interpret":
        backend, interpret = "tpu", True
    else:
        platform = platform_lib.target_platform()
        backend, interpret = _PLATFORM_BACKEND.get(platform), False
        if backend is None:
            if explicit:
                raise ValueError(f"ttt_{kind}: impl='pallas' needs a TPU or GPU backend but the program "
                                 f"is compiled for {platform!r} (the devices of the mesh set with "
                                 "jax.set_mesh, else JAX's default backend); use impl='xla', "
                                 "impl='auto' or (slow, for tests) impl='pallas_interpret'")
            return None
    group = min(remat_group_size, length // mini_batch_size)
    try:
        check_supported(kind, backend, d=d, mini_batch_size=mini_batch_size, remat_group_size=group)
    except ValueError:
        if explicit:
            raise
        return None
    return backend, interpret


@functools.lru_cache(maxsize=None)
def _scan(backend, kind, b, group, interpret):
    """The custom-VJP scan of one backend's kernels for one static configuration.

    TPU (Mosaic): q, k, v [B, H, L, d] unpadded in their dtypes (the kernels form the target y
    and its VJP), w packed [B, H, NG, G, b] float32. GPU (Triton): q, k, y, w [B, H, Lp, 1]
    padded float32. The third input is v or y accordingly.
    """
    kernels = BACKENDS[backend]
    opts = dict(b=b, group=group, interpret=interpret)

    @jax.custom_vjp
    def scan(q, k, v_or_y, w, gamma, beta, state0):
        z, _, final = kernels.forward(kind, q, k, v_or_y, w, gamma, beta, state0, **opts)
        return z, final

    def scan_fwd(q, k, v_or_y, w, gamma, beta, state0):
        z, ckpts, final = kernels.forward(kind, q, k, v_or_y, w, gamma, beta, state0, **opts)
        return (z, final), (q, k, v_or_y, w, gamma, beta, ckpts)

    def scan_bwd(res, cotangents):
        q, k, v_or_y, w, gamma, beta, ckpts = res
        dz, dfinal = cotangents
        dq, dk, dv_or_y, dw, dgamma, dbeta, dstate0 = kernels.backward(
            kind, q, k, v_or_y, w, gamma, beta, ckpts, dz.astype(q.dtype), tuple(dfinal), **opts)
        # The kernels return per-(batch, head) LayerNorm gradients; gamma/beta are per head.
        return (dq, dk, dv_or_y, dw, jnp.sum(dgamma, axis=0), jnp.sum(dbeta, axis=0),
                tuple(dstate0))

    scan.defvjp(scan_fwd, scan_bwd)
    return scan


def mesh_layout(mesh, bsz: int, heads: int, rules=None):
    """The mesh axes that shard the batch and the heads dims of the scan's inputs.

    Args:
      mesh: the current (abstract) mesh; its manual axes (inside a caller's `shard_map`) are
        already split and left out.
      bsz, heads: B and H of q [B, H, L, d].
      rules: logical rules; default the active `nnx.logical_axis_rules`, else `DEFAULT_RULES`
        (what `with_logical_constraint` uses for the layer's `sharding.BHLD`).
    Returns:
      (batch_axes, head_axes), tuples of mesh axis names. An axis is kept while the product of
      the kept axes divides the dim (`shard_map` splits evenly; a dropped axis replicates the
      dim, which XLA gathers) and shards only the first of batch, heads that names it.
    """
    rules = rules if rules is not None else (core_spmd.get_logical_axis_rules()
                                             or sharding_lib.DEFAULT_RULES)
    spec = tuple(sharding_lib.logical_to_spec(("activation_batch", "activation_heads"), rules))
    spec += (None,) * (2 - len(spec))
    manual, used, out = set(mesh.manual_axes), set(), []
    for dim, entry in zip((bsz, heads), spec):
        names = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
        kept, ways = [], 1
        for a in names:
            if a in mesh.shape and a not in manual and a not in used and dim % (ways * mesh.shape[a]) == 0:
                kept.append(a)
                used.add(a)
                ways *= mesh.shape[a]
        out.append(tuple(kept))
    return tuple(out)


def ttt_scan(kind, q, k, v, eta, params, *, mini_batch_size: int, remat_group_size: int = 16,
             backend: str, interpret: bool = False, initial_state=None, return_state: bool = False):
    """Non-causal TTT-MLP (kind="mlp") or TTT-Linear (kind="linear") scan in a Pallas kernel.

    The arguments are those `tttjax.ops.ttt.validate` accepts (`ttt_mlp(..., impl="pallas")`
    validates them and calls this); here only the kernel's own limits are checked.

    Args:
      q, k, v: [B, H, L, d], any float dtype (q, k L2-normalised and rotated, v raw).
      eta: [B, H, L] per-token step size base_lr * sigmoid(.) / d (the op applies 1/b).
      params: W1, b1 (, W2, b2) initial state [H, ...] and ln_weight, ln_bias [H, d];
        shapes as in `tttjax.ops.ttt.PARAM_SHAPES`.
      mini_batch_size: b; L must be a multiple of it.
      remat_group_size: mini-batches per checkpoint (and per kernel grid step on TPU).
      backend: "tpu" (Mosaic) or "gpu" (Triton).
      interpret: run the kernel in Pallas interpret mode (TPU interpret params for "tpu").
      initial_state: optional dict of [B, H, ...] arrays replacing params' state.
      return_state: also return the final state (dict of [B, H, ...] float32).
    Returns:
      z [B, H, L, d] in q's dtype, or (z, final_state) with return_state.

    Under a mesh with axes that are not yet manual, the scan runs in `jax.shard_map` over them:
    q, k, v, eta, initial_state split as P(batch_axes, head_axes) from `mesh_layout`, params
    and the LayerNorm split over heads, the sequence whole on each device; outputs come back
    in that layout. Gradients of params replicated over the batch axes are summed over them by
    shard_map's transpose.
    """
    bsz, h, length, d = q.shape
    group = min(remat_group_size, length // mini_batch_size)
    check_supported(kind, backend, d=d, mini_batch_size=mini_batch_size, remat_group_size=group)
    local = functools.partial(_local_scan, kind, mini_batch_size=mini_batch_size, group=group,
                              backend=backend, interpret=bool(interpret), return_state=return_state)

    mesh = jax.sharding.get_abstract_mesh()
    free = () if mesh is None or mesh.empty else tuple(
        a for a in mesh.axis_names if a not in set(mesh.manual_axes))
    if not free:  # no mesh, or every axis already manual (inside the caller's shard_map)
        return local(q, k, v, eta, params, initial_state)

    batch_axes, head_axes = mesh_layout(mesh, bsz, h)
    be, he = sharding_lib.axes_entry(batch_axes), sharding_lib.axes_entry(head_axes)
    seq, per_pair, per_head = P(be, he, None, None), P(be, he), P(he)
    names = ttt_step.STATE_NAMES[kind]
    args = (q, k, v, eta, dict(params), None if initial_state is None else dict(initial_state))
    in_specs = (seq, seq, seq, P(be, he, None), {key: per_head for key in params},
                None if initial_state is None else {key: per_pair for key in initial_state})
    out_specs = (seq, {key: per_pair for key in names}) if return_state else seq
    if set(mesh.explicit_axes) & set(free):
        # Explicit-sharding meshes want the arguments laid out as in_specs already.
        args = tuple(x if x is None else jax.tree.map(jax.reshard, x, spec)
                     for x, spec in zip(args, in_specs))
    # check_vma=False: a pallas_call's out_shape carries no varying-axes type, which the check
    # would require; without it shard_map's transpose still sums the cotangents of inputs
    # replicated over an axis (params over the batch axes; tested against the XLA op).
    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs,
                         axis_names=frozenset(free), check_vma=False)(*args)


def _local_scan(kind, q, k, v, eta, params, initial_state, *, mini_batch_size, group, backend,
                interpret, return_state):
    """`ttt_scan` on one device's arrays (validated; group = the effective remat group)."""
    bsz, h, length, d = q.shape
    b = mini_batch_size
    n = length // b

    f32 = jnp.float32
    names = ttt_step.STATE_NAMES[kind]
    gamma = params["ln_weight"].astype(f32)[:, None, :]        # [H, 1, d]
    beta = params["ln_bias"].astype(f32)[:, None, :]
    w = eta.astype(f32) * (1.0 / b)                            # [B, H, L]
    if initial_state is None:
        state0 = tuple(jnp.broadcast_to(params[key].astype(f32), (bsz,) + params[key].shape)
                       for key in names)
    else:
        state0 = tuple(initial_state[key].astype(f32) for key in names)

    if backend == "tpu":
        # Unpadded token arrays in their own dtype (the kernels skip the last group's missing
        # mini-batches and compute y in VMEM); eta / b as rows of b (see ttt_tpu). A 16-bit
        # array whose mini-batch is not whole packed (16, 128) tiles goes in as float32.
        def kernel_dtype(x):
            size = x.dtype.itemsize
            return x if size in (2, 4) and b % (8 * 4 // size) == 0 else x.astype(f32)

        z, final = _scan("tpu", kind, b, group, interpret)(
            kernel_dtype(q), kernel_dtype(k), kernel_dtype(v), ttt_tpu.pack_w(w, b, group),
            gamma, beta, state0)
    else:
        qf, kf, vf = (x.astype(f32) for x in (q, k, v))
        y = ttt_step.target(kf, vf, gamma, beta)
        w = w[..., None]                                       # [B, H, L, 1]
        padded = -(-n // group) * group * b
        if padded != length:
            pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
            qf, kf, y, w = (jnp.pad(x, pad) for x in (qf, kf, y, w))
        z, final = _scan("gpu", kind, b, group, interpret)(qf, kf, y, w, gamma, beta, state0)
    z = z[:, :, :length].astype(q.dtype)
    if return_state:
        return z, dict(zip(names, final))
    return z
