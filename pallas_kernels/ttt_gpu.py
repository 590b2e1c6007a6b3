"""GPU (Triton lowering) kernels for the non-causal TTT scan: the inner state lives in registers.

Pallas' Triton backend has no scratch memory, so one program per (batch, head) pair (grid
(B, H)) holds the inner state as `fori_loop` carries, i.e. in the registers of its thread
block (Triton spills to local memory when they do not fit), and walks the whole sequence:
an outer loop over remat groups (storing the group's starting state as its checkpoint) and an
inner loop over the group's mini-batches. Triton needs power-of-two tensor sizes and `tl.dot`
operands of at least 16 along every dimension; matmuls run at IEEE float32 (HIGHEST).

Backward: one program per pair walks the groups in reverse, carrying the state cotangent and
dgamma/dbeta as loop carries. It recomputes the group's per-mini-batch states from the
checkpoint into a [G, ...] per-pair workspace in global memory (small enough to stay in L2
while it is used; a thread-block barrier orders the writes before the reads), then runs
`backward_step` over the group's mini-batches in reverse.

Array layouts are those of `pallas_kernels.ttt_tpu`; the math is the shared `ttt_step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import ttt_step

_SQ = pl.squeezed
# Warps per program: the d = 64 TTT-MLP state (W1 and W2, 128 KiB float32) needs many threads'
# registers to stay resident; smaller states need fewer.
_REGISTER_BYTES_PER_WARP = 32 * 255 * 4


def _is_pow2(x):
    return x > 0 and x & (x - 1) == 0


def check_supported(kind, d, b, group):
    """Raises ValueError naming the Triton constraint a shape breaks."""
    if not (_is_pow2(d) and _is_pow2(b)):
        raise ValueError(f"pallas GPU (Triton) kernel: head dim d={d} and mini_batch_size={b} must be "
                         "powers of two (Triton tensor sizes); use impl='xla'")
    if d < 16 or b < 16:
        raise ValueError(f"pallas GPU (Triton) kernel: head dim d={d} and mini_batch_size={b} must be "
                         ">= 16 (minimum tl.dot tile along every matmul dimension); use impl='xla'")


def num_warps(kind, d):
    """Enough warps that the float32 state (and as much again of intermediates) fits registers."""
    f = ttt_step.hidden_width(kind, d)
    state_bytes = 4 * (d * f + f + (f * d + d if kind == "mlp" else 0))
    warps = 4
    while warps < 16 and 2 * state_bytes > warps * _REGISTER_BYTES_PER_WARP:
        warps *= 2
    return warps


def _compiler_params(kind, d):
    return pltr.CompilerParams(num_warps=num_warps(kind, d), num_stages=1)


def _block_specs(shapes, lp, d, n_groups):
    """BlockSpecs over the grid (B, H) shared by both kernels: one program's whole sequence
    [Lp, d] and w [Lp, 1], per-head [1, d], its states and all its checkpoints."""
    seq = pl.BlockSpec((_SQ, _SQ, lp, d), lambda i, j: (i, j, 0, 0))
    seq_w = pl.BlockSpec((_SQ, _SQ, lp, 1), lambda i, j: (i, j, 0, 0))
    head = pl.BlockSpec((_SQ, 1, d), lambda i, j: (j, 0, 0))
    state = [pl.BlockSpec((_SQ, _SQ, *s), lambda i, j: (i, j, 0, 0)) for s in shapes]
    ckpt = [pl.BlockSpec((_SQ, _SQ, n_groups, *s), lambda i, j: (i, j, 0, 0, 0)) for s in shapes]
    return seq, seq_w, head, state, ckpt


def forward(kind, q, k, y, w, gamma, beta, state0, *, b, group, interpret=False):
    """Same contract as `pallas_kernels.ttt_tpu.forward`."""
    bsz, h, lp, d = q.shape
    ns = len(state0)
    n_groups = lp // (group * b)
    shapes = [s.shape[2:] for s in state0]
    seq, seq_w, head, state, ckpt = _block_specs(shapes, lp, d, n_groups)

    def kernel(q_ref, k_ref, y_ref, w_ref, gamma_ref, beta_ref, *refs):
        s0_refs, z_ref = refs[:ns], refs[ns]
        ck_refs, fin_refs = refs[ns + 1:2 * ns + 1], refs[2 * ns + 1:]
        gamma, beta = gamma_ref[...], beta_ref[...]

        def group_body(g, st):
            for c, s in zip(ck_refs, st):
                c[g] = s

            def body(j, st):
                rows = pl.ds((g * group + j) * b, b)
                new, z = ttt_step.forward_step(kind, st, q_ref[rows, :], k_ref[rows, :],
                                               y_ref[rows, :], w_ref[rows, :], gamma, beta)
                z_ref[rows, :] = z
                return new

            return lax.fori_loop(0, group, body, st)

        st = lax.fori_loop(0, n_groups, group_body, tuple(s[...] for s in s0_refs))
        for f, s in zip(fin_refs, st):
            f[...] = s

    f32 = jnp.float32
    out_shape = ([jax.ShapeDtypeStruct(q.shape, f32)]
                 + [jax.ShapeDtypeStruct((bsz, h, n_groups, *s), f32) for s in shapes]
                 + [jax.ShapeDtypeStruct((bsz, h, *s), f32) for s in shapes])
    outs = pl.pallas_call(
        kernel,
        grid=(bsz, h),
        in_specs=[seq, seq, seq, seq_w, head, head, *state],
        out_specs=[seq, *ckpt, *state],
        out_shape=out_shape,
        compiler_params=_compiler_params(kind, d),
        interpret=interpret,
        name=f"ttt_{kind}_fwd_gpu",
    )(q, k, y, w, gamma, beta, *state0)
    return outs[0], tuple(outs[1:1 + ns]), tuple(outs[1 + ns:])


def backward(kind, q, k, y, w, gamma, beta, ckpts, dz, dfinal, *, b, group, interpret=False):
    """Same contract as `pallas_kernels.ttt_tpu.backward`."""
    bsz, h, lp, d = q.shape
    ns = len(ckpts)
    n_groups = lp // (group * b)
    shapes = [c.shape[3:] for c in ckpts]
    seq, seq_w, head, state, ckpt = _block_specs(shapes, lp, d, n_groups)
    per_pair = pl.BlockSpec((_SQ, _SQ, 1, d), lambda i, j: (i, j, 0, 0))
    work = [pl.BlockSpec((_SQ, _SQ, group, *s), lambda i, j: (i, j, 0, 0, 0)) for s in shapes]

    def kernel(q_ref, k_ref, y_ref, w_ref, gamma_ref, beta_ref, dz_ref, *refs):
        ck_refs, dfin_refs = refs[:ns], refs[ns:2 * ns]
        dq_ref, dk_ref, dy_ref, dw_ref, dgamma_ref, dbeta_ref = refs[2 * ns:2 * ns + 6]
        ds0_refs, work_refs = refs[2 * ns + 6:3 * ns + 6], refs[3 * ns + 6:]
        gamma, beta = gamma_ref[...], beta_ref[...]

        def group_body(i, carry):
            dst, dgamma_acc, dbeta_acc = carry
            g = n_groups - 1 - i

            def forward_body(j, st):
                rows = pl.ds((g * group + j) * b, b)
                new = ttt_step.advance_state(kind, st, k_ref[rows, :], y_ref[rows, :],
                                             w_ref[rows, :], gamma, beta)
                for a, s in zip(work_refs, new):
                    a[j + 1] = s
                return new

            start = tuple(c[g] for c in ck_refs)
            for a, s in zip(work_refs, start):
                a[0] = s
            lax.fori_loop(0, group - 1, forward_body, start)
            if not interpret:  # (the interpreter runs sequentially and has no barrier)
                pltr.debug_barrier()  # the workspace writes above land before the reads below

            def backward_body(i2, carry):
                dst, dgamma_acc, dbeta_acc = carry
                j = group - 1 - i2
                rows = pl.ds((g * group + j) * b, b)
                dst, dq, dk, dy, dw, dgamma, dbeta = ttt_step.backward_step(
                    kind, tuple(a[j] for a in work_refs), q_ref[rows, :], k_ref[rows, :],
                    y_ref[rows, :], w_ref[rows, :], gamma, beta, dz_ref[rows, :], dst)
                dq_ref[rows, :] = dq
                dk_ref[rows, :] = dk
                dy_ref[rows, :] = dy
                dw_ref[rows, :] = dw
                return dst, dgamma_acc + dgamma, dbeta_acc + dbeta

            carry = lax.fori_loop(0, group, backward_body, (dst, dgamma_acc, dbeta_acc))
            if not interpret:
                pltr.debug_barrier()  # this group's reads finish before the next group overwrites
            return carry

        zeros = jnp.zeros((1, d), jnp.float32)
        dst, dgamma_acc, dbeta_acc = lax.fori_loop(
            0, n_groups, group_body, (tuple(f[...] for f in dfin_refs), zeros, zeros))
        for ds0, s in zip(ds0_refs, dst):
            ds0[...] = s
        dgamma_ref[...] = dgamma_acc
        dbeta_ref[...] = dbeta_acc

    f32 = jnp.float32
    out_shape = ([jax.ShapeDtypeStruct(q.shape, f32)] * 3
                 + [jax.ShapeDtypeStruct(w.shape, f32)]
                 + [jax.ShapeDtypeStruct((bsz, h, 1, d), f32)] * 2
                 + [jax.ShapeDtypeStruct((bsz, h, *s), f32) for s in shapes]
                 + [jax.ShapeDtypeStruct((bsz, h, group, *s), f32) for s in shapes])
    outs = pl.pallas_call(
        kernel,
        grid=(bsz, h),
        in_specs=[seq, seq, seq, seq_w, head, head, seq, *ckpt, *state],
        out_specs=[seq, seq, seq, seq_w, per_pair, per_pair, *state, *work],
        out_shape=out_shape,
        compiler_params=_compiler_params(kind, d),
        interpret=interpret,
        name=f"ttt_{kind}_bwd_gpu",
    )(q, k, y, w, gamma, beta, dz, *ckpts, *dfinal)
    dq, dk, dy, dw, dgamma, dbeta = outs[:6]
    return dq, dk, dy, dw, dgamma, dbeta, tuple(outs[6:6 + ns])
