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

Shapes (f32): q, k, y [B, H, Lp, d]; w (eta / b) [B, H, Lp, 1]; gamma, beta [H, 1, d];
state arrays [B, H, r, c] (W1 [d, F], b1 [1, F], W2 [F, d], b2 [1, d]). Lp = n_groups * G * b.
"""

from __future__ import annotations

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
    blocks = 7 * _tile_bytes((t, d)) + 2 * _tile_bytes((t, 1)) + 4 * _tile_bytes((1, d))
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


def _compiler_params(kind, d, b, group):
    need = vmem_bytes(kind, d, b, group)
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=int(min(need + need // 4 + 8 * 2**20, _VMEM_LIMIT_CAP_BYTES)))


def _interpret_arg(interpret):
    return pltpu.InterpretParams() if interpret else False


def forward(kind, q, k, y, w, gamma, beta, state0, *, b, group, interpret=False):
    """Runs the scan. Returns z [B, H, Lp, d], checkpoints (tuple of [B, H, NG, r, c]) and
    the final state (tuple of [B, H, r, c]); all float32."""
    bsz, h, lp, d = q.shape
    ns = len(state0)
    t = group * b
    n_groups = lp // t
    shapes = [s.shape[2:] for s in state0]

    tok = pl.BlockSpec((_SQ, _SQ, t, d), lambda i, j, g: (i, j, g, 0))
    tok_w = pl.BlockSpec((_SQ, _SQ, t, 1), lambda i, j, g: (i, j, g, 0))
    head = pl.BlockSpec((_SQ, 1, d), lambda i, j, g: (j, 0, 0))
    state = [pl.BlockSpec((_SQ, _SQ, *s), lambda i, j, g: (i, j, 0, 0)) for s in shapes]
    ckpt = [pl.BlockSpec((_SQ, _SQ, _SQ, *s), lambda i, j, g: (i, j, g, 0, 0)) for s in shapes]

    def kernel(q_ref, k_ref, y_ref, w_ref, gamma_ref, beta_ref, *refs):
        s0_refs, (z_ref,), ck_refs, fin_refs, st_refs = (
            refs[:ns], refs[ns:ns + 1], refs[ns + 1:2 * ns + 1], refs[2 * ns + 1:3 * ns + 1],
            refs[3 * ns + 1:])
        g = pl.program_id(2)

        @pl.when(g == 0)
        def _():
            for s, s0 in zip(st_refs, s0_refs):
                s[...] = s0[...]

        for c, s in zip(ck_refs, st_refs):
            c[...] = s[...]
        gamma, beta = gamma_ref[...], beta_ref[...]

        def body(j, carry):
            rows = pl.ds(pl.multiple_of(j * b, b), b)
            new, z = ttt_step.forward_step(kind, tuple(s[...] for s in st_refs), q_ref[rows, :],
                                           k_ref[rows, :], y_ref[rows, :], w_ref[rows, :],
                                           gamma, beta)
            for s, v in zip(st_refs, new):
                s[...] = v
            z_ref[rows, :] = z
            return carry

        lax.fori_loop(0, group, body, 0)

        @pl.when(g == n_groups - 1)
        def _():
            for f, s in zip(fin_refs, st_refs):
                f[...] = s[...]

    f32 = jnp.float32
    out_shape = ([jax.ShapeDtypeStruct(q.shape, f32)]
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
        interpret=_interpret_arg(interpret),
        name=f"ttt_{kind}_fwd_tpu",
    )(q, k, y, w, gamma, beta, *state0)
    return outs[0], tuple(outs[1:1 + ns]), tuple(outs[1 + ns:])


def backward(kind, q, k, y, w, gamma, beta, ckpts, dz, dfinal, *, b, group, interpret=False):
    """Gradients of the scan. Returns dq, dk, dy [B, H, Lp, d], dw [B, H, Lp, 1],
    dgamma, dbeta [B, H, 1, d] (per batch element; the caller sums) and dstate0 (tuple of
    [B, H, r, c]); all float32."""
    bsz, h, lp, d = q.shape
    ns = len(ckpts)
    t = group * b
    n_groups = lp // t
    shapes = [c.shape[3:] for c in ckpts]

    def rev(g):
        return n_groups - 1 - g

    tok = pl.BlockSpec((_SQ, _SQ, t, d), lambda i, j, g: (i, j, rev(g), 0))
    tok_w = pl.BlockSpec((_SQ, _SQ, t, 1), lambda i, j, g: (i, j, rev(g), 0))
    head = pl.BlockSpec((_SQ, 1, d), lambda i, j, g: (j, 0, 0))
    per_pair = pl.BlockSpec((_SQ, _SQ, 1, d), lambda i, j, g: (i, j, 0, 0))
    state = [pl.BlockSpec((_SQ, _SQ, *s), lambda i, j, g: (i, j, 0, 0)) for s in shapes]
    ckpt = [pl.BlockSpec((_SQ, _SQ, _SQ, *s), lambda i, j, g: (i, j, rev(g), 0, 0)) for s in shapes]

    def kernel(q_ref, k_ref, y_ref, w_ref, gamma_ref, beta_ref, dz_ref, *refs):
        ck_refs, dfin_refs = refs[:ns], refs[ns:2 * ns]
        dq_ref, dk_ref, dy_ref, dw_ref, dgamma_ref, dbeta_ref = refs[2 * ns:2 * ns + 6]
        ds0_refs = refs[2 * ns + 6:3 * ns + 6]
        dst_refs, all_refs = refs[3 * ns + 6:4 * ns + 6], refs[4 * ns + 6:]
        g = pl.program_id(2)
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

        def forward_body(j, carry):
            rows = pl.ds(pl.multiple_of(j * b, b), b)
            new = ttt_step.advance_state(kind, tuple(a[j] for a in all_refs), k_ref[rows, :],
                                         y_ref[rows, :], w_ref[rows, :], gamma, beta)
            for a, v in zip(all_refs, new):
                a[j + 1] = v
            return carry

        lax.fori_loop(0, group - 1, forward_body, 0)

        def backward_body(i, carry):
            j = group - 1 - i
            rows = pl.ds(pl.multiple_of(j * b, b), b)
            dstate, dq, dk, dy, dw, dgamma, dbeta = ttt_step.backward_step(
                kind, tuple(a[j] for a in all_refs), q_ref[rows, :], k_ref[rows, :],
                y_ref[rows, :], w_ref[rows, :], gamma, beta, dz_ref[rows, :],
                tuple(s[...] for s in dst_refs))
            for s, v in zip(dst_refs, dstate):
                s[...] = v
            dq_ref[rows, :] = dq
            dk_ref[rows, :] = dk
            dy_ref[rows, :] = dy
            dw_ref[rows, :] = dw
            dgamma_ref[...] += dgamma
            dbeta_ref[...] += dbeta
            return carry

        lax.fori_loop(0, group, backward_body, 0)

        @pl.when(g == n_groups - 1)
        def _():
            for ds0, dst in zip(ds0_refs, dst_refs):
                ds0[...] = dst[...]

    f32 = jnp.float32
    out_shape = ([jax.ShapeDtypeStruct(q.shape, f32)] * 3
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
        interpret=_interpret_arg(interpret),
        name=f"ttt_{kind}_bwd_tpu",
    )(q, k, y, w, gamma, beta, dz, *ckpts, *dfinal)
    dq, dk, dy, dw, dgamma, dbeta = outs[:6]
    return dq, dk, dy, dw, dgamma, dbeta, tuple(outs[6:])
