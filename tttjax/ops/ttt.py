"""TTT-MLP and TTT-Linear inner loops as pure functions (docs/design.md §1).

The hidden state of a TTT layer is the weights `W` of a small network `g(x; W)`. For every
mini-batch `B_i` of `b` consecutive tokens the state takes one gradient step of the
self-supervised loss `l_t(W) = 1/2 ||LN(g(k_t; W)) - y_t||^2` and is then applied to the
queries of the same mini-batch (update, then apply):

    W_i = W_{i-1} - sum_{t in B_i} (eta_t / b) grad_W l_t(W_{i-1})
    z_t = q_t + LN(g(q_t; W_i))

Inner gradients are closed form (no autodiff inside the loop). The outer gradient of the
non-causal scan (without inner-loss diagnostics) is a `jax.custom_vjp` whose backward is the
hand-derived per-mini-batch VJP of `pallas_kernels.ttt_step` (the one the Pallas kernels run):
it keeps one state per group of `remat_group_size` mini-batches and recomputes inside the group
(`_custom_vjp_scan`). The causal form and the inner-loss diagnostics take JAX autodiff through
the closed-form steps, with `jax.checkpoint` around the same groups; `_ttt(..., vjp="autodiff")`
runs that path for the non-causal form too (the previous implementation, kept as the
reference the tests and `python -m tttjax.bench ops` compare against). On CPU the custom-VJP
scan traces its steps with row sums as matmuls (`_cpu_row_sums`): same numbers, less time
there.

All inner arithmetic is float32 whatever the input dtype; `z` is returned in q's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ttt as pallas_ttt
from pallas_kernels import ttt_step
from tttjax import platform

Kind = Literal["mlp", "linear"]

PARAM_SHAPES = {
    # name: shape as a function of (H, d)
    "mlp": {
        "W1": lambda h, d: (h, d, 4 * d),
        "b1": lambda h, d: (h, 1, 4 * d),
        "W2": lambda h, d: (h, 4 * d, d),
        "b2": lambda h, d: (h, 1, d),
        "ln_weight": lambda h, d: (h, d),
        "ln_bias": lambda h, d: (h, d),
    },
    "linear": {
        "W1": lambda h, d: (h, d, d),
        "b1": lambda h, d: (h, 1, d),
        "ln_weight": lambda h, d: (h, d),
        "ln_bias": lambda h, d: (h, d),
    },
}
STATE_KEYS = ttt_step.STATE_NAMES  # the inner state's names per kind (one home: ttt_step)


class InnerLoss(NamedTuple):
    """Mean inner loss per mini-batch, [B, H, n_mini_batches] float32 each."""

    before: jax.Array  # l(W_{i-1}) on the keys/targets of mini-batch i
    after: jax.Array   # l(W_i) on the same tokens, after the update


# --------------------------------------------------------------------------- math pieces
# The formulas live in `pallas_kernels.ttt_step` (shared with the kernels); these are the op's
# public spellings of them, on [..., b, d] arrays.

gelu_tanh = ttt_step.gelu
gelu_tanh_grad = ttt_step.gelu_grad


@jax.custom_vjp
def reconstruction_target(k, v, gamma, beta):
    """`ttt_step.target` on [B, H, L, d] float32 k, v with per-head gamma, beta [H, 1, d],
    differentiated by its hand-derived VJP (`ttt_step.target_backward`, tested against
    autodiff) whose sums are matmuls with a ones vector on CPU (as the step functions'
    `row_sums_as_matmuls`): XLA:CPU runs autodiff's sums of products over these long
    arrays 5-10x slower (README, "Measured: ops benchmark")."""
    return ttt_step.target(k, v, gamma, beta)


def _target_fwd(k, v, gamma, beta):
    return ttt_step.target(k, v, gamma, beta), (k, v, gamma)


def _target_bwd(residuals, dy):
    k, v, gamma = residuals
    as_matmuls = _sums_as_matmuls()

    def col_sum(x):  # x like k -> gamma's shape: summed over the axes gamma broadcasts along
        if as_matmuls and x.ndim == 4 and gamma.shape == (x.shape[1], 1, x.shape[3]):
            ones = jnp.ones((x.shape[0], x.shape[2]), x.dtype)
            return jnp.einsum("bl,bhld->hd", ones, x,
                              precision=jax.lax.Precision.HIGHEST)[:, None, :]
        padded = (1,) * (x.ndim - gamma.ndim) + gamma.shape
        axes = tuple(i for i, (a, g) in enumerate(zip(x.shape, padded)) if g == 1 and a != 1)
        return jnp.sum(x, axis=axes, keepdims=True).reshape(gamma.shape)

    grads = _cpu_row_sums(ttt_step.target_backward)(k, v, gamma, dy, col_sum)
    return tuple(map(_match_vma, grads, (k, v, gamma, gamma)))


reconstruction_target.defvjp(_target_fwd, _target_bwd)


def layer_norm_forward(z, gamma, beta):
    """Per-head LayerNorm with biased variance. z [..., b, d]; gamma, beta [..., 1, d].
    Returns (gamma * zhat + beta, zhat, std)."""
    zhat, std = ttt_step.ln_stats(z)
    return gamma * zhat + beta, zhat, std


def layer_norm_backward(grad_out, zhat, std, gamma):
    """Closed-form gradient of `layer_norm_forward` w.r.t. its input z."""
    return ttt_step.ln_input_grad(grad_out * gamma, zhat, std)


# --------------------------------------------------------------------------- one mini-batch


def _forward_net(x, state, kind):
    """g(x; W) with intermediates. x [B,H,b,d]; state arrays [B,H,...]."""
    z1 = jnp.einsum("bhnd,bhdf->bhnf", x, state["W1"]) + state["b1"]
    if kind == "linear":
        return z1, (z1,)
    x2 = gelu_tanh(z1)
    z2 = jnp.einsum("bhnf,bhfd->bhnd", x2, state["W2"]) + state["b2"]
    return z2, (z1, x2)


def _minibatch_step(state, inputs, *, kind: Kind, causal: bool, with_loss: bool):
    """One update-then-apply step for every (batch, head) pair.

    state:  W1 [B,H,d,F], b1 [B,H,1,F] (+ W2 [B,H,F,d], b2 [B,H,1,d]) float32
    inputs: q, k, y [B,H,b,d]; eta [B,H,b]; gamma, beta [H,1,d]; row_scale [b] float32
    """
    q, k, y, eta, gamma, beta, row_scale = inputs
    b = q.shape[-2]

    # Gradient of sum_t 1/2 ||LN(g(k_t)) - y_t||^2 at the current state, per token.
    zk, inter = _forward_net(k, state, kind)
    ln_k, zhat, std = layer_norm_forward(zk, gamma, beta)
    grad_out = layer_norm_backward(ln_k - y, zhat, std, gamma)     # dl_t / dZ_last
    if kind == "mlp":
        z1, x2 = inter
        grad_z1 = jnp.einsum("bhnd,bhfd->bhnf", grad_out, state["W2"]) * gelu_tanh_grad(z1)

    if not causal:
        # Non-causal: every token of the mini-batch sees the state after all b gradients.
        w = (eta * row_scale[-1])[..., None]                          # eta_t / b
        new = {"W1": state["W1"] - jnp.einsum("bhnd,bhnf->bhdf", k, w * (grad_z1 if kind == "mlp" else grad_out))}
        new["b1"] = state["b1"] - jnp.sum(w * (grad_z1 if kind == "mlp" else grad_out), axis=-2, keepdims=True)
        if kind == "mlp":
            new["W2"] = state["W2"] - jnp.einsum("bhnf,bhnd->bhfd", x2, w * grad_out)
            new["b2"] = state["b2"] - jnp.sum(w * grad_out, axis=-2, keepdims=True)
        zq, _ = _forward_net(q, new, kind)
    else:
        # Causal (ttt-lm): token j sees the state after gradients of tokens 1..j of its
        # mini-batch, scaled by row_scale[j]. Dual form: the per-row states are never built.
        mask = jnp.tril(jnp.ones((b, b), jnp.float32))
        coeff = mask * row_scale[:, None] * eta[..., None, :]          # [B,H,b(j),b(t)]
        g1 = grad_z1 if kind == "mlp" else grad_out
        a1 = coeff * (jnp.einsum("bhjd,bhtd->bhjt", q, k) + 1.0)
        zq1 = jnp.einsum("bhjd,bhdf->bhjf", q, state["W1"]) + state["b1"] - jnp.einsum("bhjt,bhtf->bhjf", a1, g1)
        w = (eta * row_scale[-1])[..., None]
        new = {"W1": state["W1"] - jnp.einsum("bhnd,bhnf->bhdf", k, w * g1),
               "b1": state["b1"] - jnp.sum(w * g1, axis=-2, keepdims=True)}
        if kind == "linear":
            zq = zq1
        else:
            xq2 = gelu_tanh(zq1)
            a2 = coeff * (jnp.einsum("bhjf,bhtf->bhjt", xq2, x2) + 1.0)
            zq = (jnp.einsum("bhjf,bhfd->bhjd", xq2, state["W2"]) + state["b2"]
                  - jnp.einsum("bhjt,bhtd->bhjd", a2, grad_out))
            new["W2"] = state["W2"] - jnp.einsum("bhnf,bhnd->bhfd", x2, w * grad_out)
            new["b2"] = state["b2"] - jnp.sum(w * grad_out, axis=-2, keepdims=True)

    z = q + layer_norm_forward(zq, gamma, beta)[0]
    if not with_loss:
        return new, (z, None)
    loss_before = 0.5 * jnp.mean(jnp.sum((ln_k - y) ** 2, axis=-1), axis=-1)
    zk_new, _ = _forward_net(k, new, kind)
    ln_new = layer_norm_forward(zk_new, gamma, beta)[0]
    loss_after = 0.5 * jnp.mean(jnp.sum((ln_new - y) ** 2, axis=-1), axis=-1)
    return new, (z, (loss_before, loss_after))


# --------------------------------------------------------------------------- custom-VJP scan


def _match_vma(cotangent, primal):
    """Under `shard_map`, sums a cotangent over the mesh axes it varies over and its primal
    does not (what the transpose of the implicit `pvary` does on the autodiff path: e.g. the
    LayerNorm parameters, replicated over a batch axis that shards q)."""
    extra = _varying_axes(cotangent) - _varying_axes(primal)
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying_axes(x):
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.9 tracks varying axes here, older as .vma
    return set(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _per_pair(fn, n_pair_args, n_head_args, n_pair_tail=0):
    """vmap a 2-D per-(batch, head) function of `ttt_step` over [B, H, ...] arrays.

    Arguments: `n_pair_args` arrays with leading [B, H], then `n_head_args` per-head arrays
    [H, ...] (gamma, beta), then `n_pair_tail` more [B, H, ...] arrays.
    """
    axes_h = (0,) * (n_pair_args + n_head_args + n_pair_tail)
    axes_b = (0,) * n_pair_args + (None,) * n_head_args + (0,) * n_pair_tail
    return jax.vmap(jax.vmap(fn, in_axes=axes_h), in_axes=axes_b)


def _reset(state, state0, r):
    """The state a mini-batch starts from: `state0` in the rows where a packed segment starts
    (r [B] > 0), else `state` (tuples of [B, H, ...])."""
    return tuple(jnp.where(r.reshape(r.shape + (1,) * (a.ndim - 1)) > 0, a0, a)
                 for a, a0 in zip(state, state0))


def _sums_as_matmuls() -> bool:
    """Whether the op's sums are traced as matmuls with a ones vector: a caller's own
    `ttt_step.row_sums_as_matmuls` choice, else on CPU only (there each small reduction is a
    separate library call that costs more than the matmul)."""
    choice = ttt_step.row_sums_choice()
    return platform.target_platform() == "cpu" if choice is None else choice


def _cpu_row_sums(fn):
    """`fn` traced with `ttt_step.row_sums_as_matmuls(_sums_as_matmuls())`."""
    @functools.wraps(fn)
    def wrapped(*args):
        with ttt_step.row_sums_as_matmuls(_sums_as_matmuls()):
            return fn(*args)
    return wrapped


@functools.lru_cache(maxsize=None)
def _custom_vjp_scan(kind, group, resets=False):
    """Non-causal scan over groups of `group` mini-batches with a hand-derived backward.

    scan(q, k, y, w, r, gamma, beta, init, state0) -> (z, final state), with q, k, y
    [NG, G, B, H, b, d] float32, w = eta / b [NG, G, B, H, b, 1], gamma, beta [H, 1, d], init
    (the state the scan starts from) a tuple of [B, H, ...] float32 (W1, b1 (, W2, b2)). z has
    q's shape. Packed segments (`resets=True`): r [NG, G, B] float32, 1 where a segment starts
    at that mini-batch, whose step then starts from state0 (like init; the call's initial
    state) instead of the carried state; the backward sends the state cotangent at each reset
    to state0 (summed over resets) and none across the boundary. Without: r, state0 None.

    The forward rule keeps one state per group (the checkpoint). The backward walks the groups
    in reverse; for each it recomputes the group's steps from its checkpoint, keeping each
    step's state and a few intermediates (`ttt_step.step_residuals`), then walks the steps in
    reverse with the exact per-step VJP of `pallas_kernels.ttt_step` (tested against `jax.vjp`
    of `_minibatch_step`), so no autodiff goes through the closed-form inner gradient. Live
    memory: the inputs, one state per group and one group's residuals, as with the autodiff
    scan's `jax.checkpoint` groups. Every (batch, head) pair runs in the same batched matmuls.
    """
    fwd_step = _cpu_row_sums(_per_pair(functools.partial(ttt_step.forward_step, kind), 5, 2))
    residuals = _cpu_row_sums(_per_pair(functools.partial(ttt_step.step_residuals, kind), 5, 2))

    def _bwd(state, new, res, q, k, w, gamma, dz, dnew):
        return ttt_step.backward_from_residuals(kind, state, new, res, q, k, w, gamma, dz, dnew)

    bwd = _cpu_row_sums(jax.vmap(jax.vmap(_bwd, in_axes=(0,) * 9),
                                 in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0)))

    def start(st, state0, r):
        return st if r is None else _reset(st, state0, r)

    def run_group(state, xs, gamma, beta, state0):
        def body(st, x):
            q, k, y, w, r = x
            return fwd_step(start(st, state0, r), q, k, y, w, gamma, beta)
        return jax.lax.scan(body, state, xs)

    @jax.custom_vjp
    def scan(q, k, y, w, r, gamma, beta, init, state0):
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), (q, k, y, w, r))
        final, z = run_group(init, flat, gamma, beta, state0)
        return z.reshape(q.shape), final

    def scan_fwd(q, k, y, w, r, gamma, beta, init, state0):
        def outer(st, xs):
            new, z = run_group(st, xs, gamma, beta, state0)
            return new, (z, st)
        final, (z, ckpts) = jax.lax.scan(outer, init, (q, k, y, w, r))
        return (z, final), (q, k, y, w, r, gamma, beta, ckpts, state0)

    def scan_bwd(res, cotangents):
        q, k, y, w, r, gamma, beta, ckpts, state0 = res
        dz, dfinal = cotangents

        def group_bwd(carry, xs):
            dst, ds0 = carry
            qg, kg, yg, wg, rg, dzg, ckpt = xs

            def recompute(st, x):
                qi, ki, yi, wi, ri = x
                res_i, new = residuals(start(st, state0, ri), qi, ki, yi, wi, gamma, beta)
                return new, (st, res_i)
            end, (states, res_g) = jax.lax.scan(recompute, ckpt, (qg, kg, yg, wg, rg))

            def back(c, x):
                dst, new, ds0 = c
                st, res_i, qi, ki, wi, ri, dzi = x
                dst, dq, dk, dy, dw, dg, db = bwd(start(st, state0, ri), new, res_i, qi, ki, wi,
                                                  gamma, dzi, dst)
                if ri is not None:  # a reset: the cotangent goes to state0, none across it
                    ds0 = tuple(a + b for a, b in zip(ds0, _reset(tuple(map(jnp.zeros_like, dst)),
                                                                   dst, ri)))
                    dst = _reset(dst, tuple(map(jnp.zeros_like, dst)), ri)
                # Walking backwards, the state before step j is the state after step j - 1.
                # (The LayerNorm gradients leave as outputs, not carries: under shard_map a
                # zero carry would not match their varying type.)
                return (dst, st, ds0), (dq, dk, dy, dw, jnp.sum(dg, 0), jnp.sum(db, 0))

            (dst, _, ds0), grads = jax.lax.scan(
                back, (dst, end, ds0), (states, res_g, qg, kg, wg, rg, dzg), reverse=True)
            return (dst, ds0), grads

        ds0 = None if r is None else tuple(jnp.zeros_like(x) for x in dfinal)
        (dinit, ds0), (dq, dk, dy, dw, dgamma, dbeta) = jax.lax.scan(
            group_bwd, (tuple(dfinal), ds0), (q, k, y, w, r, dz, ckpts), reverse=True)
        dr = None if r is None else jnp.zeros_like(r)
        grads = (dq, dk, dy, dw, dr, jnp.sum(dgamma, (0, 1)), jnp.sum(dbeta, (0, 1)), dinit, ds0)
        primals = (q, k, y, w, r, gamma, beta, ckpts_first(ckpts), state0)
        return jax.tree.map(_match_vma, grads, primals)

    def ckpts_first(ckpts):  # the types of state0 (the first checkpoint is state0)
        return tuple(c[0] for c in ckpts)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan


def _ttt_custom_vjp(kind, qf, kf, y, eta, gamma, beta, state, *, b, group, resets=None):
    """The non-causal scan through `_custom_vjp_scan`: blocks, groups and the remainder group.

    qf, kf, y [B, H, L, d] float32; eta [B, H, L]; state a dict of [B, H, ...] float32;
    resets None or [B, n] float32 (`segment_starts`).
    Returns (z [B, H, L, d] float32, final state dict).
    """
    bsz, h, length, d = qf.shape
    n = length // b
    g = min(group, n)
    n_full = (n // g) * g
    keys = STATE_KEYS[kind]
    w = (eta.astype(jnp.float32) * (1.0 / b))[..., None]

    def to_blocks(x):  # [B, H, L, c] -> [n, B, H, b, c]
        return jnp.moveaxis(x.reshape(bsz, h, n, b, x.shape[-1]), 2, 0)

    xs = tuple(to_blocks(x) for x in (qf, kf, y, w))
    xs += (None if resets is None else resets.T,)                 # r: [n, B]
    st = tuple(state[key] for key in keys)
    st0 = None if resets is None else st  # what a packed segment's first step starts from
    with_resets = resets is not None
    zs = []
    if n_full:
        grouped = tuple(None if x is None else x[:n_full].reshape(n_full // g, g, *x.shape[1:])
                        for x in xs)
        z, st = _custom_vjp_scan(kind, g, with_resets)(*grouped, gamma, beta, st, st0)
        zs.append(z.reshape(n_full, *z.shape[2:]))
    if n_full < n:  # the remainder: one shorter group
        rest = tuple(None if x is None else x[n_full:][None] for x in xs)
        z, st = _custom_vjp_scan(kind, n - n_full, with_resets)(*rest, gamma, beta, st, st0)
        zs.append(z[0])
    z = zs[0] if len(zs) == 1 else jnp.concatenate(zs, axis=0)
    z = jnp.moveaxis(z, 0, 2).reshape(bsz, h, length, d)
    return z, dict(zip(keys, st))


# --------------------------------------------------------------------------- validation


Impl = Literal["xla", "auto", "pallas", "pallas_interpret"]
IMPLS = ("xla", "auto", "pallas", "pallas_interpret")


def check_impl(name: str, impl) -> None:
    """Raises ValueError unless `impl` is one of `IMPLS` (the op's and the layers' one check)."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {list(IMPLS)}, got {impl!r}")


def validate(kind, q, k, v, eta, params, mini_batch_size, remat_group_size, initial_state):
    """Raises ValueError naming the first argument of `ttt_mlp` / `ttt_linear` that breaks the
    op's contract (shapes, keys, sizes). Every entry point calls it once, before dispatch."""
    name = f"ttt_{kind}"
    if kind not in PARAM_SHAPES:
        raise ValueError(f"TTT op: kind must be 'mlp' or 'linear', got {kind!r}")
    if q.ndim != 4:
        raise ValueError(f"{name}: q must be [B, H, L, d], got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{name}: q, k, v must share one shape [B, H, L, d]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    bsz, h, length, d = q.shape
    if eta.shape != (bsz, h, length):
        raise ValueError(f"{name}: eta must be [B, H, L] = {(bsz, h, length)}, got {eta.shape}")
    if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"{name}: mini_batch_size must be a positive int, got {mini_batch_size!r}")
    if length % mini_batch_size:
        raise ValueError(
            f"{name}: sequence length L={length} is not a multiple of mini_batch_size="
            f"{mini_batch_size}; pad the sequence to {-(-length // mini_batch_size) * mini_batch_size} "
            "tokens or choose a mini-batch size that divides L")
    if not isinstance(remat_group_size, int) or remat_group_size < 1:
        raise ValueError(f"{name}: remat_group_size must be a positive int, got {remat_group_size!r}")
    if not isinstance(params, Mapping):
        raise ValueError(f"{name}: params must be a dict, got {type(params).__name__}")
    expected = PARAM_SHAPES[kind]
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise ValueError(f"{name}: wrong param keys: missing {missing}, unexpected {unknown}; "
                         f"expected exactly {sorted(expected)}")
    for key, shape_fn in expected.items():
        want = shape_fn(h, d)
        if tuple(params[key].shape) != want:
            raise ValueError(f"{name}: params['{key}'] must have shape {want} for H={h}, d={d}, "
                             f"got {tuple(params[key].shape)}")
    if initial_state is not None:
        keys = STATE_KEYS[kind]
        if set(initial_state) != set(keys):
            raise ValueError(f"{name}: initial_state must have keys {list(keys)}, got {sorted(initial_state)}")
        for key in keys:
            want = (bsz,) + expected[key](h, d)
            if tuple(initial_state[key].shape) != want:
                raise ValueError(f"{name}: initial_state['{key}'] must have shape {want}, "
                                 f"got {tuple(initial_state[key].shape)}")


def segment_starts(name, segment_ids, bsz, length, b):
    """Where packed sequences start, per mini-batch (docs/design.md §1, packed sequences).

    Args:
      segment_ids: [B, L] int, one id per packed sequence; a new sequence starts at token t > 0
        where the id differs from token t - 1's. Every start must be a multiple of b (the
        mini-batch form cannot reset the state inside a mini-batch).
    Returns:
      (resets [B, n] float32, 1 where mini-batch i starts a new sequence (never i = 0: the
      first mini-batch starts from the initial state anyway), bad): for concrete ids a start
      inside a mini-batch raises ValueError and bad is None; for traced ids (under jit) it
      cannot, and bad [B] bool marks the rows that have one (the op returns NaN there).
    """
    ids = jnp.asarray(segment_ids)
    if ids.shape != (bsz, length):
        raise ValueError(f"{name}: segment_ids must be [B, L] = {(bsz, length)}, got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name}: segment_ids must be integers (one id per packed sequence), "
                         f"got {ids.dtype}")
    change = ids[:, 1:] != ids[:, :-1]                           # token t + 1 starts a sequence
    misaligned = change & (jnp.arange(1, length) % b != 0)
    bad = None
    try:
        misaligned_np = np.asarray(misaligned)
    except jax.errors.TracerArrayConversionError:
        bad = jnp.any(misaligned, axis=1)
    else:
        if misaligned_np.any():
            row, t = (int(i) for i in np.argwhere(misaligned_np)[0])
            raise ValueError(
                f"{name}: segment_ids start a new sequence at token {t + 1} of row {row}, not a "
                f"multiple of mini_batch_size={b} (the inner state can only reset between "
                f"mini-batches); pad each packed sequence to a multiple of {b} tokens with mask=0 "
                "(TTT layers) or eta=0 (the op)")
    resets = jnp.concatenate([jnp.zeros((bsz, 1), bool), change[:, b - 1::b]], axis=1)
    return resets.astype(jnp.float32), bad


# --------------------------------------------------------------------------- the scan


def _ttt(kind, q, k, v, eta, params, *, mini_batch_size, remat_group_size, causal,
         token_idx_offset, initial_state, return_state, return_inner_loss, vjp="custom",
         validated=False, segment_ids=None):
    """The XLA scan (arguments as `ttt_mlp`; `validated`: the caller already ran `validate`)."""
    if not validated:
        validate(kind, q, k, v, eta, params, mini_batch_size, remat_group_size, initial_state)
    bsz, h, length, d = q.shape
    b = mini_batch_size
    n = length // b
    f32 = jnp.float32
    resets = bad = None
    if segment_ids is not None:
        resets, bad = segment_starts(f"ttt_{kind}", segment_ids, bsz, length, b)

    gamma = params["ln_weight"].astype(f32)[:, None, :]      # [H,1,d]
    beta = params["ln_bias"].astype(f32)[:, None, :]
    qf, kf, vf = (x.astype(f32) for x in (q, k, v))
    y = reconstruction_target(kf, vf, gamma, beta)

    if causal:
        row_scale = 1.0 / jnp.arange(1, b + 1, dtype=f32)
        if token_idx_offset is not None:
            if token_idx_offset.shape != (b,):
                raise ValueError(f"ttt_{kind}: token_idx_offset must be [mini_batch_size]={b}, "
                                 f"got {token_idx_offset.shape}")
            # ttt-lm clamps the learnable step-size scale at zero.
            row_scale = jnp.maximum(row_scale + token_idx_offset.astype(f32), 0.0)
    else:
        if token_idx_offset is not None:
            raise ValueError(f"ttt_{kind}: token_idx_offset is only used with causal=True")
        row_scale = jnp.full((b,), 1.0 / b, f32)

    if initial_state is None:
        state = {key: jnp.broadcast_to(params[key].astype(f32), (bsz,) + params[key].shape)
                 for key in STATE_KEYS[kind]}
    else:
        state = {key: initial_state[key].astype(f32) for key in STATE_KEYS[kind]}

    def poison(z):  # traced segment_ids with a start inside a mini-batch: NaN, never wrong
        return z if bad is None else jnp.where(bad[:, None, None, None], jnp.nan, z)

    if vjp == "custom" and not causal and not return_inner_loss:
        z, state = _ttt_custom_vjp(kind, qf, kf, y, eta, gamma, beta, state, b=b,
                                   group=remat_group_size, resets=resets)
        z = poison(z).astype(q.dtype)
        return (z, state) if return_state else z

    # [B,H,L,...] -> [n, B, H, b, ...]: the scan walks the leading mini-batch axis.
    def to_blocks(x):
        x = x.reshape(bsz, h, n, b, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    xs = (to_blocks(qf), to_blocks(kf), to_blocks(y), to_blocks(eta.astype(f32)),
          None if resets is None else resets.T)                      # resets: [n, B]
    step = functools.partial(_minibatch_step, kind=kind, causal=causal, with_loss=return_inner_loss)
    keys = STATE_KEYS[kind]
    state0 = state

    def scan_group(carry, group_xs):
        def body(c, x):
            *x, r = x
            if r is not None:  # a packed sequence starts: back to the initial state
                c = dict(zip(keys, _reset(tuple(c[key] for key in keys),
                                          tuple(state0[key] for key in keys), r)))
            return step(c, (*x, gamma, beta, row_scale))
        return jax.lax.scan(body, carry, group_xs)

    # Rematerialise whole groups: the backward pass keeps one state per group.
    scan_group = jax.checkpoint(scan_group, prevent_cse=False)

    g = min(remat_group_size, n)
    n_full = (n // g) * g
    outs = []
    if n_full:
        grouped = jax.tree.map(lambda x: x[:n_full].reshape(n_full // g, g, *x.shape[1:]), xs)
        state, out = jax.lax.scan(scan_group, state, grouped)
        outs.append(jax.tree.map(lambda x: x.reshape(n_full, *x.shape[2:]), out))
    if n_full < n:
        state, out = scan_group(state, jax.tree.map(lambda x: x[n_full:], xs))
        outs.append(out)
    out = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *outs) if len(outs) > 1 else outs[0]

    z_blocks, losses = out
    z = poison(jnp.moveaxis(z_blocks, 0, 2).reshape(bsz, h, length, d)).astype(q.dtype)
    extras = []
    if return_state:
        extras.append(state)
    if return_inner_loss:
        extras.append(InnerLoss(before=jnp.moveaxis(losses[0], 0, -1),
                                after=jnp.moveaxis(losses[1], 0, -1)))
    return (z, *extras) if extras else z


def _dispatch(kind, impl, q, k, v, eta, params, *, mini_batch_size, remat_group_size, causal,
              token_idx_offset, initial_state, return_state, return_inner_loss, segment_ids):
    """The one place that checks `impl`, validates the arguments and picks the XLA scan or the
    Pallas kernel (`pallas_kernels.ttt.select`)."""
    check_impl(f"ttt_{kind}", impl)
    validate(kind, q, k, v, eta, params, mini_batch_size, remat_group_size, initial_state)
    target = pallas_ttt.select(kind, impl, d=q.shape[-1], length=q.shape[2],
                               mini_batch_size=mini_batch_size,
                               remat_group_size=remat_group_size, causal=causal,
                               return_inner_loss=return_inner_loss,
                               token_idx_offset=token_idx_offset,
                               segment_ids=segment_ids is not None)
    if target is not None:
        backend, interpret = target
        return pallas_ttt.ttt_scan(kind, q, k, v, eta, params, mini_batch_size=mini_batch_size,
                                   remat_group_size=remat_group_size, backend=backend,
                                   interpret=interpret, initial_state=initial_state,
                                   return_state=return_state)
    return _ttt(kind, q, k, v, eta, params, mini_batch_size=mini_batch_size,
                remat_group_size=remat_group_size, causal=causal,
                token_idx_offset=token_idx_offset, initial_state=initial_state,
                return_state=return_state, return_inner_loss=return_inner_loss, validated=True,
                segment_ids=segment_ids)


def _public_op(kind: Kind, name: str, doc: str):
    """`ttt_mlp` / `ttt_linear`: one signature, two kinds."""
    def op(q, k, v, eta, params, *, mini_batch_size: int, remat_group_size: int = 16,
           return_state: bool = False, causal: bool = False, token_idx_offset=None,
           initial_state=None, return_inner_loss: bool = False, impl: Impl = "xla",
           segment_ids=None):
        return _dispatch(kind, impl, q, k, v, eta, params, mini_batch_size=mini_batch_size,
                         remat_group_size=remat_group_size, causal=causal,
                         token_idx_offset=token_idx_offset, initial_state=initial_state,
                         return_state=return_state, return_inner_loss=return_inner_loss,
                         segment_ids=segment_ids)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    return op


ttt_mlp = _public_op("mlp", "ttt_mlp", """TTT-MLP inner loop (docs/design.md §1): g(x; W) = GELU_tanh(x W1 + b1) W2 + b2.

    Args:
      q, k: [B, H, L, d], already L2-normalised and rotated; any float dtype.
      v: [B, H, L, d] raw values; the op forms the normalised target of v - k.
      eta: [B, H, L] per-token step size base_lr * sigmoid(.) / d; the op applies 1/b
        (non-causal) or 1/j (causal, token j of its mini-batch).
      params: dict with W1 [H, d, 4d], b1 [H, 1, 4d], W2 [H, 4d, d], b2 [H, 1, d] (the initial
        inner state, shared by every sequence) and ln_weight, ln_bias [H, d].
      mini_batch_size: b; L must be a multiple of it.
      remat_group_size: mini-batches per rematerialised group.
      return_state: also return the final inner state (dict of [B, H, ...] float32).
      causal: the ttt-lm form, causal inside each mini-batch.
      token_idx_offset: optional learnable [b] offset added to 1/j (causal only).
      initial_state: optional dict W1, b1, W2, b2 with a leading batch axis [B, H, ...]
        that replaces params' state, to continue a sequence processed in pieces.
      return_inner_loss: also return `InnerLoss` (per mini-batch, before/after the step).
      impl: "xla" (this module's scan), "pallas" (the fused kernel of `pallas_kernels` for the
        default backend, TPU or GPU; ValueError where it cannot run), "auto" (the kernel where
        the backend, shape and options allow, else the XLA scan) or "pallas_interpret" (the TPU
        kernel in Pallas interpret mode, any platform; slow, for tests). The kernels cover the
        non-causal form without inner-loss diagnostics or segment_ids.
      segment_ids: optional [B, L] int, one id per packed sequence (a new one starts where the
        id changes): at each start the inner state resets to the initial state (initial_state,
        else params'), so nothing flows between sequences, gradients included. Starts must be
        multiples of mini_batch_size (ValueError naming the first that is not; traced ids
        cannot raise and give NaN rows instead). The XLA scan only: impl="auto" runs it,
        impl="pallas" raises.
    Returns:
      z [B, H, L, d] in q's dtype (z_t = q_t + LN(g(q_t; W_i)), before post_norm and wo);
      with extras requested, the tuple (z, state?, inner_loss?) in that order.
    """)

ttt_linear = _public_op("linear", "ttt_linear", """TTT-Linear inner loop (docs/design.md §1): g(x; W) = x W1 + b1.

    Same arguments and returns as `ttt_mlp`, with params W1 [H, d, d], b1 [H, 1, d],
    ln_weight, ln_bias [H, d] (initial_state: W1, b1 with a leading batch axis).
    """)
