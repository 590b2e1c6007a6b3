"""TPU (Mosaic) kernels for the non-causal TTT scan: the inner state lives in VMEM scratch.

Grid (B, H, n_groups): the two leading axes are independent ("parallel": megacore chips split
them across TensorCores); the group axis is sequential ("arbitrary"), so the VMEM scratch that
holds the inner state survives from one group to the next. A group is `remat_group_size`
mini-batches of `b` tokens: its q/k/y/eta blocks are DMA'd in by the Pallas pipeline while the
previous group computes, and an in-kernel `fori_loop` walks its mini-batches.

Forward writes z and, per group, the state at the group's start (the remat checkpoint) and, at
the last group, the final state. Backward walks the groups in reverse (the index maps flip the
group axis), recomputes the group's states from its checkpoint into a [G, ...] VMEM scratch,
then runs `backward_step` over the group's mini-batches in reverse, carrying the state
cotangent in VMEM and accumulating dgamma/dbeta in output blocks that stay resident.

The kernels take q, k, v as the layer gives them (bf16 or float32; float32 in VMEM) and form the
reconstruction target y of v - k per mini-batch (`ttt_step.target`; its VJP in the backward),
and write z, dq, dk, dv in the inputs' dtypes: no float32 copy of a token array (q, k, y, z,
dz, dq, dk, dy: 1 GiB each at the 5B shape per chip) ever goes to HBM, and the custom VJP's
residuals are the bf16 q, k, v themselves.

Shapes: q, k, v [B, H, L, d] with L = n * b (not padded: when the G * b token blocks do not
divide L, the last group's blocks reach past the end; Pallas reads what is there and drops the
writes beyond L, and the kernels skip the mini-batches >= n); float32 below: w (eta / b)
[B, H, NG, G, b], one row of b per mini-batch, zero-padded to NG * G mini-batches (`pack_w`);
gamma, beta [H, 1, d]; state arrays [B, H, r, c] (W1 [d, F], b1 [1, F], W2 [F, d], b2 [1, d]).

Why w is [.., G, b] and not the per-token column [B, H, L, 1]: TPU arrays are tiled (8, 128)
over their last two dims, so a trailing dim of 1 pads each token to 128 lanes: at the 5B shape
(12 heads per chip, L = 341k) w and dw took 2 GiB of HBM each and their VMEM blocks 512 KiB.
As rows of b the padding is at most 2x. Inside the kernel a mini-batch's row becomes the [b, 1]
column the step math wants (`_row_to_column`), and dw goes back the same way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import ttt_step

# Every current TPU generation has at least 64 MiB of VMEM per TensorCore (v7x); leave room for
# Mosaic's own spills of the step's intermediates.
VMEM_BUDGET_BYTES = 48 * 2**20
_VMEM_LIMIT_CAP_BYTES = 60 * 2**20  # the compiler limit asked for: estimate + margin, below 64 MiB
_SQ = pl.squeezed


def _tile_bytes(shape, itemsize=4):
    """Bytes a float32 array takes in VMEM: last two dims padded to the (8, 128) tile."""
    *lead, r, c = shape
    n = 1
    for x in lead:
        n *= x
    return n * (-(-r // 8) * 8) * (-(-c // 128) * 128) * itemsize


def _state_shapes(kind, d):
    f = ttt_step.hidden_width(kind, d)
    shapes = [(d, f), (1, f)]
    if kind == "mlp":
        shapes += [(f, d), (1, d)]
    return shapes


def vmem_bytes(kind, d, b, group):
    """Estimated VMEM footprint of the larger (backward) kernel, double-buffered blocks included."""
    t = group * b
    states = sum(_tile_bytes(s) for s in _state_shapes(kind, d))
    blocks = 7 * _tile_bytes((t, d)) + 2 * _tile_bytes((group, b)) + 4 * _tile_bytes((1, d))
    blocks += 3 * states                                  # checkpoint, final cotangent, dstate0
    scratch = states + group * states                     # state cotangent + the group's states
    f = ttt_step.hidden_width(kind, d)
    temporaries = 16 * _tile_bytes((b, f))                # the step's live intermediates
    return 2 * blocks + scratch + temporaries


def check_supported(kind, d, b, group):
    """Raises ValueError naming the TPU constraint a shape breaks."""
    if b % 8:
        raise ValueError(f"pallas TPU kernel: mini_batch_size={b} must be a multiple of 8 (the f32 "
                         "sublane tile) so each mini-batch is an aligned slice of its VMEM block; "
                         "use impl='xla' or a mini-batch size such as 8, 16, 64")
    if d % 8:
        raise ValueError(f"pallas TPU kernel: head dim d={d} must be a multiple of 8 (sublane tile "
                         "of the W1 [d, F] state); use impl='xla'")
    need = vmem_bytes(kind, d, b, group)
    if need > VMEM_BUDGET_BYTES:
        raise ValueError(f"pallas TPU kernel: d={d}, mini_batch_size={b}, remat_group_size={group} "
                         f"needs ~{need / 2**20:.1f} MiB of VMEM, over the {VMEM_BUDGET_BYTES / 2**20:.0f} "
                         "MiB budget; lower remat_group_size or use impl='xla'")


def vmem_limit_bytes(kind, d, b, group):
    """The scoped-VMEM limit the kernels ask Mosaic for: the estimate + 25% + 8 MiB, capped."""
    need = vmem_bytes(kind, d, b, group)
    return int(min(need + need // 4 + 8 * 2**20, _VMEM_LIMIT_CAP_BYTES))


def _compiler_params(kind, d, b, group):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=vmem_limit_bytes(kind, d, b, group))


def _interpret_arg(interpret):
    return pltpu.InterpretParams() if interpret else False


def pack_w(w, b, group):
    """Per-token step sizes [B, H, L] (eta / b, float32) -> the kernels' [B, H, NG, G, b].

    Mini-batch i of group g is row i; the mini-batches after the last (L = n * b, NG = ceil(n /
    G)) are zero. The backward's dw comes in the same layout; autodiff of this pad and reshape
    takes it back to [B, H, L].
    """
    bsz, h, length = w.shape
    n = length // b
    n_groups = -(-n // group)
    w = w.reshape(bsz, h, n, b)
    if n_groups * group != n:
        w = jnp.pad(w, ((0, 0), (0, 0), (0, n_groups * group - n), (0, 0)))
    return w.reshape(bsz, h, n_groups, group, b)


def _row_to_column(row):
    """[1, b] -> [b, 1] (a select and a lane reduction: no transpose of an unaligned shape)."""
    b = row.shape[-1]
    eye = lax.broadcasted_iota(jnp.int32, (b, b), 0) == lax.broadcasted_iota(jnp.int32, (b, b), 1)
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _column_to_row(col):
    """[b, 1] -> [1, b]."""
    b = col.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (b, b), 0) == lax.broadcasted_iota(jnp.int32, (b, b), 1)
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _select_row(block, j):
    """Row j (traced) of a [G, b] block as [1, b]."""
    rows = lax.broadcasted_iota(jnp.int32, block.shape, 0)
    return jnp.sum(jnp.where(rows == j, block, 0.0), axis=0, keepdims=True)


def _guarded(ragged, valid):
    """Decorator running a loop body only where `valid` (traced bool) when the last group is
    ragged; unconditionally otherwise (no branch in the common case)."""
    def wrap(fn):
        if ragged:
            pl.when(valid)(fn)
        else:
            fn()
    return wrap


# --------------------------------------------------------------------------- cost estimates

_TRANSCENDENTAL = {"tanh", "exp", "log", "sqrt", "rsqrt", "logistic", "erf"}


@functools.lru_cache(maxsize=None)
def step_costs(kind, d, b):
    """(matmul FLOPs, transcendentals) of one (batch, head) mini-batch: forward_step,
    advance_state, backward_step, counted from their traced jaxprs (2 m n k per dot_general)."""
    f32 = jnp.float32
    st = tuple(jax.ShapeDtypeStruct(s, f32) for s in _state_shapes(kind, d))
    tok = jax.ShapeDtypeStruct((b, d), f32)
    col = jax.ShapeDtypeStruct((b, 1), f32)
    row = jax.ShapeDtypeStruct((1, d), f32)

    def count(fn, *args):
        flops = trans = 0
        for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
            out = math.prod(eqn.outvars[0].aval.shape)
            if eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                flops += 2 * out * math.prod(lhs[i] for i in lc)
            elif eqn.primitive.name in _TRANSCENDENTAL:
                trans += out
        return flops, trans

    fwd = count(lambda *a: ttt_step.forward_step(kind, *a), st, tok, tok, tok, col, row, row)
    adv = count(lambda *a: ttt_step.advance_state(kind, *a), st, tok, tok, col, row, row)
    bwd = count(lambda *a: ttt_step.backward_step(kind, *a), st, tok, tok, tok, col, row, row,
                tok, st)
    return {"forward": fwd, "advance": adv, "backward": bwd}


def _cost(kind, d, b, pairs, n, group, backward, arrays):
    """pl.CostEstimate of a kernel call over `pairs` (B * H) sequences of n mini-batches, so that
    XLA's cost analysis (and its scheduler) sees the kernel's work; bytes: its operands and
    results once."""
    costs = step_costs(kind, d, b)
    if backward:
        n_groups = -(-n // group)
        recomputed = max(n - n_groups, 0)  # every mini-batch but each group's first
        flops = costs["backward"][0] * n + costs["advance"][0] * recomputed
        trans = costs["backward"][1] * n + costs["advance"][1] * recomputed
    else:
        flops, trans = costs["forward"][0] * n, costs["forward"][1] * n
    nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
    return pl.CostEstimate(flops=int(flops * pairs), transcendentals=int(trans * pairs),
                           bytes_accessed=int(nbytes))


# --------------------------------------------------------------------------- kernels


def _block_specs(shapes, d, b, group, group_index):
    """BlockSpecs over the grid (B, H, n_groups) shared by both kernels: token blocks of one
    group [G b, d], its w rows [G, b], per-head [1, d], per-pair states and per-group
    checkpoints. `group_index(g)` maps the grid's group step to the group it works on (the
    backward walks them in reverse)."""
    tok = pl.BlockSpec((_SQ, _SQ, group * b, d), lambda i, j, g: (i, j, group_index(g), 0))
    tok_w = pl.BlockSpec((_SQ, _SQ, _SQ, group, b), lambda i, j, g: (i, j, group_index(g), 0, 0))
    head = pl.BlockSpec((_SQ, 1, d), lambda i, j, g: (j, 0, 0))
    state = [pl.BlockSpec((_SQ, _SQ, *s), lambda i, j, g: (i, j, 0, 0)) for s in shapes]
    ckpt = [pl.BlockSpec((_SQ, _SQ, _SQ, *s), lambda i, j, g: (i, j, group_index(g), 0, 0))
            for s in shapes]
    return tok, tok_w, head, state, ckpt


def forward(kind, q, k, v, w, gamma, beta, state0, *, b, group, interpret=False):
    """Runs the scan, the reconstruction target y of v - k computed in the kernel.

    Args:
      q, k, v: [B, H, L, d], L = n * b, float32 or a 16-bit float when b is a multiple of 16
        (whole packed (16, 128) tiles per mini-batch); cast to float32 in VMEM.
      w: [B, H, NG, G, b] float32 from `pack_w`.
      gamma, beta: [H, 1, d] float32.
      state0: tuple of [B, H, r, c] float32 initial states.
    Returns:
      z [B, H, L, d] in q's dtype, checkpoints (tuple of [B, H, NG, r, c] float32: the state at
      each group's start) and the final state (tuple of [B, H, r, c] float32).
    """
    bsz, h, length, d = q.shape
    ns = len(state0)
    n = length // b
    n_groups = w.shape[2]
    ragged = n % group != 0
    shapes = [s.shape[2:] for s in state0]
    f32 = jnp.float32
    tok, tok_w, head, state, ckpt = _block_specs(shapes, d, b, group, lambda g: g)

    def kernel(q_ref, k_ref, v_ref, w_ref, gamma_ref, beta_ref, *refs):
        s0_refs, (z_ref,), ck_refs, fin_refs, st_refs = (
            refs[:ns], refs[ns:ns + 1], refs[ns + 1:2 * ns + 1], refs[2 * ns + 1:3 * ns + 1],
            refs[3 * ns + 1:])
        g = pl.program_id(2)
        count = n - g * group  # mini-batches left; the group runs min(G, count) of them

        @pl.when(g == 0)
        def _():
            for s, s0 in zip(st_refs, s0_refs):
                s[...] = s0[...]

        for c, s in zip(ck_refs, st_refs):
            c[...] = s[...]
        gamma, beta = gamma_ref[...], beta_ref[...]

        def body(j, carry):
            @_guarded(ragged, j < count)
            def _():
                rows = pl.ds(pl.multiple_of(j * b, b), b)
                w_col = _row_to_column(_select_row(w_ref[...], j))
                kj, vj = k_ref[rows, :].astype(f32), v_ref[rows, :].astype(f32)
                y = ttt_step.target(kj, vj, gamma, beta)
                new, z = ttt_step.forward_step(kind, tuple(s[...] for s in st_refs),
                                               q_ref[rows, :].astype(f32), kj, y, w_col, gamma, beta)
                for s, x in zip(st_refs, new):
                    s[...] = x
                z_ref[rows, :] = z.astype(z_ref.dtype)
            return carry

        lax.fori_loop(0, group, body, 0)

        @pl.when(g == n_groups - 1)
        def _():
            for f, s in zip(fin_refs, st_refs):
                f[...] = s[...]

    out_shape = ([jax.ShapeDtypeStruct(q.shape, q.dtype)]
                 + [jax.ShapeDtypeStruct((bsz, h, n_groups, *s), f32) for s in shapes]
                 + [jax.ShapeDtypeStruct((bsz, h, *s), f32) for s in shapes])
    outs = pl.pallas_call(
        kernel,
        grid=(bsz, h, n_groups),
        in_specs=[tok, tok, tok, tok_w, head, head, *state],
        out_specs=[tok, *ckpt, *state],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(s, f32) for s in shapes],
        compiler_params=_compiler_params(kind, d, b, group),
        cost_estimate=_cost(kind, d, b, bsz * h, n, group, False,
                            [q, k, v, w, gamma, beta, *state0, *out_shape]),
        interpret=_interpret_arg(interpret),
        name=f"ttt_{kind}_fwd_tpu",
    )(q, k, v, w, gamma, beta, *state0)
    return outs[0], tuple(outs[1:1 + ns]), tuple(outs[1 + ns:])


def backward(kind, q, k, v, w, gamma, beta, ckpts, dz, dfinal, *, b, group, interpret=False):
    """Gradients of the scan, the target's VJP included.

    Args: as `forward`, plus its checkpoints, dz [B, H, L, d] (z's cotangent, q's dtype) and
      dfinal (tuple of [B, H, r, c] float32, the final state's cotangent).
    Returns:
      dq, dk, dv [B, H, L, d] in q's, k's, v's dtypes; dw [B, H, NG, G, b] float32 (zero beyond
      the last mini-batch); dgamma, dbeta [B, H, 1, d] float32 per batch element (the caller
      sums); dstate0 (tuple of [B, H, r, c] float32).
    """
    bsz, h, length, d = q.shape
    ns = len(ckpts)
    n = length // b
    n_groups = w.shape[2]
    ragged = n % group != 0
    shapes = [c.shape[3:] for c in ckpts]
    f32 = jnp.float32

    def rev(g):
        return n_groups - 1 - g

    tok, tok_w, head, state, ckpt = _block_specs(shapes, d, b, group, rev)
    per_pair = pl.BlockSpec((_SQ, _SQ, 1, d), lambda i, j, g: (i, j, 0, 0))

    def kernel(q_ref, k_ref, v_ref, w_ref, gamma_ref, beta_ref, dz_ref, *refs):
        ck_refs, dfin_refs = refs[:ns], refs[ns:2 * ns]
        dq_ref, dk_ref, dv_ref, dw_ref, dgamma_ref, dbeta_ref = refs[2 * ns:2 * ns + 6]
        ds0_refs = refs[2 * ns + 6:3 * ns + 6]
        dst_refs, all_refs = refs[3 * ns + 6:4 * ns + 6], refs[4 * ns + 6:]
        g = pl.program_id(2)
        count = n - rev(g) * group  # this group runs min(G, count) mini-batches
        gamma, beta = gamma_ref[...], beta_ref[...]

        @pl.when(g == 0)
        def _():
            for dst, dfin in zip(dst_refs, dfin_refs):
                dst[...] = dfin[...]
            dgamma_ref[...] = jnp.zeros_like(dgamma_ref)
            dbeta_ref[...] = jnp.zeros_like(dbeta_ref)

        # Recompute the states at the start of each of the group's mini-batches.
        for a, c in zip(all_refs, ck_refs):
            a[0] = c[...]
        dw_ref[...] = jnp.zeros_like(dw_ref)  # rows of skipped (padding) mini-batches stay 0

        def forward_body(j, carry):
            @_guarded(ragged, j + 1 < count)
            def _():
                rows = pl.ds(pl.multiple_of(j * b, b), b)
                w_col = _row_to_column(_select_row(w_ref[...], j))
                kj, vj = k_ref[rows, :].astype(f32), v_ref[rows, :].astype(f32)
                new = ttt_step.advance_state(kind, tuple(a[j] for a in all_refs), kj,
                                             ttt_step.target(kj, vj, gamma, beta), w_col, gamma, beta)
                for a, x in zip(all_refs, new):
                    a[j + 1] = x
            return carry

        lax.fori_loop(0, group - 1, forward_body, 0)

        def backward_body(i, carry):
            j = group - 1 - i

            @_guarded(ragged, j < count)
            def _():
                rows = pl.ds(pl.multiple_of(j * b, b), b)
                w_blk = w_ref[...]
                kj, vj = k_ref[rows, :].astype(f32), v_ref[rows, :].astype(f32)
                dstate, dq, dk, dy, dw, dgamma, dbeta = ttt_step.backward_step(
                    kind, tuple(a[j] for a in all_refs), q_ref[rows, :].astype(f32), kj,
                    ttt_step.target(kj, vj, gamma, beta), _row_to_column(_select_row(w_blk, j)),
                    gamma, beta, dz_ref[rows, :].astype(f32), tuple(s[...] for s in dst_refs))
                dk_y, dv, dgamma_y, dbeta_y = ttt_step.target_backward(kj, vj, gamma, dy)
                for s, x in zip(dst_refs, dstate):
                    s[...] = x
                dq_ref[rows, :] = dq.astype(dq_ref.dtype)
                dk_ref[rows, :] = (dk + dk_y).astype(dk_ref.dtype)
                dv_ref[rows, :] = dv.astype(dv_ref.dtype)
                sel = lax.broadcasted_iota(jnp.int32, w_blk.shape, 0) == j
                dw_ref[...] = jnp.where(sel, _column_to_row(dw), dw_ref[...])
                dgamma_ref[...] += dgamma + dgamma_y
                dbeta_ref[...] += dbeta + dbeta_y
            return carry

        lax.fori_loop(0, group, backward_body, 0)

        @pl.when(g == n_groups - 1)
        def _():
            for ds0, dst in zip(ds0_refs, dst_refs):
                ds0[...] = dst[...]

    out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
                 + [jax.ShapeDtypeStruct(w.shape, f32)]
                 + [jax.ShapeDtypeStruct((bsz, h, 1, d), f32)] * 2
                 + [jax.ShapeDtypeStruct((bsz, h, *s), f32) for s in shapes])
    outs = pl.pallas_call(
        kernel,
        grid=(bsz, h, n_groups),
        in_specs=[tok, tok, tok, tok_w, head, head, tok, *ckpt, *state],
        out_specs=[tok, tok, tok, tok_w, per_pair, per_pair, *state],
        out_shape=out_shape,
        scratch_shapes=([pltpu.VMEM(s, f32) for s in shapes]
                        + [pltpu.VMEM((group, *s), f32) for s in shapes]),
        compiler_params=_compiler_params(kind, d, b, group),
        cost_estimate=_cost(kind, d, b, bsz * h, n, group, True,
                            [q, k, v, w, gamma, beta, dz, *ckpts, *dfinal, *out_shape]),
        interpret=_interpret_arg(interpret),
        name=f"ttt_{kind}_bwd_tpu",
    )(q, k, v, w, gamma, beta, dz, *ckpts, *dfinal)
    dq, dk, dv, dw, dgamma, dbeta = outs[:6]
    return dq, dk, dv, dw, dgamma, dbeta, tuple(outs[6:])
