"""Context-parallel TTT: the TTT scan sharded over the sequence (a pure op).

Heads-over-tensor parallelism makes every device hold the whole sequence for its heads. A TTT
layer does not need that: its only dependency across tokens is the inner state (W1, b1, W2, b2
per sequence and head, ~33k floats per head at d = 64), so the sequence can stay split into
contiguous spans, one per device of a mesh axis, and only the state crosses devices.

Pipeline (inside `jax.shard_map` over `axis_name`, size cp; H local heads in G groups):

    step s = 0 .. G + cp - 2: the device at pipeline position p runs its span for head group
    g = s - p (when 0 <= g < G) from the state received from position p - 1 (position 0:
    params' initial state) and `ppermute`s its final state to position p + 1.

Every device is busy G of the G + cp - 1 steps (48 heads on cp = 4: 94%). Forward, position p is
device p; with `reverse=True` position p is device cp - 1 - p and every device scans its span
flipped, which equals flipping the whole sequence (`rev(f(rev(x)))`) without moving any token
between devices.

Gradients are JAX autodiff: the transpose of `ppermute` sends state cotangents back along the
pipeline, so the backward pass is the same pipeline run in reverse. Each pipeline step is a
`jax.checkpoint`: the backward keeps only every step's start state (G + cp - 1 small states per
device) and recomputes the span's forward from it (inside, the op's own grouped remat bounds the
recompute). Without it autodiff also keeps every step's sliced span inputs and target
(q, k, y, eta of one head group, G + cp - 1 times): TTT-MLP, H 8, L 16384, d 64, cp 8 needs
89.5 MiB of temporaries per device without, 54.6 MiB with. The price is one more forward scan
of the span during the backward pass.

Per-device memory of one op's (or with --layer one TTT layer's) fwd + bwd, compiled ahead of
time (`memory_comparison`, `layer_memory_comparison`):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m tttjax.ops.ttt_context_parallel [--layer] [--kind linear] [--length 65536]

    TTT-MLP, B 1, H 8, d 64, b 64, 8 CPU devices: temporaries in MiB
                                            L 16384   L 65536
      op     one device                       504.9    1237.6
      op     heads over tensor                 60.1     151.5
      op     context parallel                  54.6     120.2
      layer  heads over tensor, x replicated  224.0     896.0
      layer  heads over tensor, x seq-sharded 226.0     898.0
      layer  context parallel                  68.2     279.6

The op alone holds the same number of [token, head] elements per device either way; the
layer under heads-over-tensor also keeps [L, D] activations (post-norm over all heads, wo, the
input's gradient) whole on every device, where context parallelism keeps everything split.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tttjax.ops import ttt as ttt_ops
from tttjax.sharding import axes_entry, entry_axes

AxisNames = str | Sequence[str] | None


def _vary(x, axes: frozenset):
    """Marks x as varying over `axes` (scan carries must match the type of what they become)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.9 tracks varying axes here, older as .vma
    missing = tuple(sorted(axes - (mat.varying if mat is not None else aval.vma)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _resolve_mesh(mesh, name):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ValueError(f"{name}: no mesh; pass mesh= or call inside `jax.set_mesh(mesh)`")
    return mesh


def _check_axes(mesh, name, role, axes, dim_name, dim):
    size = 1
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"{name}: {role} mesh axis {a!r} is not in the mesh axes "
                             f"{tuple(mesh.axis_names)}")
        size *= mesh.shape[a]
    if dim % size:
        raise ValueError(f"{name}: {dim_name}={dim} is not divisible by the {size} devices of "
                         f"{role} axes {axes}")
    return size


def ttt_context_parallel(kind: ttt_ops.Kind, q, k, v, eta, params, *, mini_batch_size: int,
                         axis_name: str, mesh=None, remat_group_size: int = 16,
                         reverse: bool = False, head_groups: int | None = None,
                         batch_axes: AxisNames = None, head_axes: AxisNames = None,
                         causal: bool = False, token_idx_offset=None,
                         impl: ttt_ops.Impl = "xla"):
    """`ttt_mlp` / `ttt_linear` with the sequence sharded over the mesh axis `axis_name`.

    Args:
      kind: "mlp" (TTT-MLP) or "linear" (TTT-Linear).
      q, k, v: [B, H, L, d] (as for `ttt_mlp`), sharded or to be sharded as
        P(batch_axes, head_axes, axis_name, None): device i of `axis_name` (size cp) holds
        tokens [i L/cp, (i+1) L/cp).
      eta: [B, H, L], P(batch_axes, head_axes, axis_name).
      params: W1, b1 (, W2, b2) [H, ...] initial inner state and ln_weight, ln_bias [H, d]
        (shapes as `ttt_ops.PARAM_SHAPES`), P(head_axes) on the head axis.
      mini_batch_size: b; the span length L / cp must be a multiple of it.
      axis_name: the mesh axis that shards the sequence.
      mesh: a `Mesh` or `AbstractMesh`; default the one set by `jax.set_mesh`.
      remat_group_size: mini-batches per rematerialised group inside each span.
      reverse: scan the reversed sequence, i.e. return rev(op(rev(q), rev(k), rev(v),
        rev(eta))) along L, without moving tokens between devices.
      head_groups: G, the number of head groups pipelined over the devices; must divide the
        local heads H / |head_axes|. Default: one head per group (the best overlap,
        G / (G + cp - 1) of the steps busy; fewer groups give bigger per-step work).
      batch_axes, head_axes: mesh axes (a name or a tuple of names, or None) that shard B and
        H; the output keeps that layout. Mesh axes named nowhere replicate the work.
      causal, token_idx_offset, impl: as for `ttt_mlp` (impl selects the per-span scan: the
        XLA scan or the Pallas kernel).
    Returns:
      z [B, H, L, d] in q's dtype, sharded P(batch_axes, head_axes, axis_name, None); equal to
      `ttt_mlp` / `ttt_linear` on one device (reversed inputs and output for `reverse`).
    """
    name = "ttt_context_parallel"
    if kind not in ttt_ops.PARAM_SHAPES:
        raise ValueError(f"{name}: kind must be 'mlp' or 'linear', got {kind!r}")
    mesh = _resolve_mesh(mesh, name)
    if axis_name not in mesh.shape:
        raise ValueError(f"{name}: axis_name {axis_name!r} is not a mesh axis; the mesh has "
                         f"{dict(mesh.shape)}")
    batch_axes, head_axes = entry_axes(batch_axes), entry_axes(head_axes)
    named = (axis_name,) + batch_axes + head_axes
    if len(set(named)) != len(named):
        raise ValueError(f"{name}: a mesh axis may shard only one dimension; got "
                         f"axis_name={axis_name!r}, batch_axes={batch_axes}, head_axes={head_axes}")
    if q.ndim != 4:
        raise ValueError(f"{name}: q must be [B, H, L, d], got shape {q.shape}")
    bsz, h, length, _ = q.shape
    cp = mesh.shape[axis_name]
    b = mini_batch_size
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"{name}: mini_batch_size must be a positive int, got {b!r}")
    if length % cp:
        raise ValueError(f"{name}: sequence length L={length} is not divisible by the {cp} devices "
                         f"of axis {axis_name!r}; pad to {-(-length // (cp * b)) * cp * b} "
                         f"(a multiple of cp x mini_batch_size = {cp * b})")
    span = length // cp
    if span % b:
        raise ValueError(f"{name}: span length L/cp={span} (L={length}, cp={cp}) is not a multiple "
                         f"of mini_batch_size={b}; pad the sequence to "
                         f"{-(-length // (cp * b)) * cp * b} tokens (a multiple of cp x "
                         f"mini_batch_size = {cp * b})")
    ttt_ops.validate(kind, q, k, v, eta, params, mini_batch_size, remat_group_size, None)
    _check_axes(mesh, name, "batch", batch_axes, "B", bsz)
    head_ways = _check_axes(mesh, name, "head", head_axes, "H", h)
    local_heads = h // head_ways
    groups = local_heads if head_groups is None else head_groups
    if not isinstance(groups, int) or groups < 1 or local_heads % groups:
        raise ValueError(f"{name}: head_groups={head_groups!r} must be a positive divisor of the "
                         f"{local_heads} heads per device (H={h} over {head_ways} head shards)")

    batch_e, head_e = axes_entry(batch_axes), axes_entry(head_axes)
    seq_spec = P(batch_e, head_e, axis_name, None)
    eta_spec = P(batch_e, head_e, axis_name)
    param_specs = {key: P(head_e) for key in params}
    offset_spec = None if token_idx_offset is None else P()
    body = functools.partial(
        _pipeline, kind=kind, axis_name=axis_name, cp=cp, groups=groups, reverse=reverse,
        varying=frozenset(named), mini_batch_size=b, remat_group_size=remat_group_size,
        causal=causal, impl=impl)
    in_specs = (seq_spec, seq_spec, seq_spec, eta_spec, param_specs, offset_spec)
    args = (q, k, v, eta, dict(params), token_idx_offset)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Explicit-sharding meshes require arguments already laid out as in_specs.
        args = jax.tree.map(lambda x, spec: jax.reshard(x, _named(mesh, spec)), args, in_specs)
    # A Pallas kernel's outputs carry no varying-manual-axes type, which check_vma requires;
    # the kernel path turns the check off (the XLA path keeps it as a guard on the pipeline).
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=seq_spec,
                         check_vma=impl == "xla")(*args)


def _named(mesh, spec):
    return jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec


def _pipeline(q, k, v, eta, params, token_idx_offset, *, kind, axis_name, cp, groups, reverse,
              varying, mini_batch_size, remat_group_size, causal, impl):
    """One device's part: q, k, v [B, Hl, S, d], eta [B, Hl, S] (its span), params [Hl, ...]."""
    op = ttt_ops.ttt_mlp if kind == "mlp" else ttt_ops.ttt_linear
    device = jax.lax.axis_index(axis_name)
    if reverse:
        q, k, v, eta = (jnp.flip(x, axis=2) for x in (q, k, v, eta))
        position = cp - 1 - device
        perm = [(i, i - 1) for i in range(1, cp)]
    else:
        position = device
        perm = [(i, i + 1) for i in range(cp - 1)]
    bsz, local_heads, span, d = q.shape
    hg = local_heads // groups

    def by_group(x):  # [B, Hl, ...] -> [B, G, hg, ...]
        return x.reshape(bsz, groups, hg, *x.shape[2:])

    q_g, k_g, v_g, eta_g = (by_group(x) for x in (q, k, v, eta))
    params_g = {key: p.reshape(groups, hg, *p.shape[1:]) for key, p in params.items()}
    state_keys = ttt_ops.STATE_KEYS[kind]

    def initial_state(g):
        return {key: jnp.broadcast_to(params_g[key][g].astype(jnp.float32),
                                      (bsz, hg) + params_g[key].shape[2:]) for key in state_keys}

    # A checkpoint per pipeline step: autodiff keeps only the start state (see module doc).
    # Not around a Pallas kernel: its custom VJP already saves only the span's inputs and one
    # state per remat group, and the kernels' interpret mode (IO callbacks) cannot be remat'd.
    def run_span(state, g):
        def take(x):
            return jax.lax.dynamic_index_in_dim(x, g, axis=1, keepdims=False)
        p = {key: jax.lax.dynamic_index_in_dim(x, g, axis=0, keepdims=False)
             for key, x in params_g.items()}
        return op(take(q_g), take(k_g), take(v_g), take(eta_g), p, mini_batch_size=mini_batch_size,
                  remat_group_size=remat_group_size, causal=causal,
                  token_idx_offset=token_idx_offset, initial_state=state, return_state=True,
                  impl=impl)

    if impl == "xla":
        run_span = jax.checkpoint(run_span, prevent_cse=False)

    def step(carry, s):
        received, out = carry
        g = s - position
        active = (g >= 0) & (g < groups)
        g_safe = jnp.clip(g, 0, groups - 1)
        # Idle steps (and position 0) start from W0, so their discarded work stays finite and
        # no cotangent leaks into the received state of an idle step.
        start = initial_state(g_safe)
        use_received = active & (position > 0)
        state = jax.tree.map(lambda r, w: jnp.where(use_received, r, w), received, start)
        z, final = run_span(state, g_safe)
        # Idle steps write into the spare slot G, sliced off below.
        out = jax.lax.dynamic_update_index_in_dim(out, z, jnp.where(active, g, groups), axis=1)
        return (jax.lax.ppermute(final, axis_name, perm), out), None

    received0 = jax.tree.map(lambda x: _vary(x, varying), initial_state(0))
    out0 = _vary(jnp.zeros((bsz, groups + 1, hg, span, d), q.dtype), varying)
    (_, out), _ = jax.lax.scan(step, (received0, out0), jnp.arange(groups + cp - 1))
    z = out[:, :groups].reshape(bsz, local_heads, span, d)
    return jnp.flip(z, axis=2) if reverse else z


# --------------------------------------------------------------------------- memory check


def memory_comparison(kind: ttt_ops.Kind = "mlp", *, batch: int = 1, heads: int = 8,
                      length: int = 16384, head_dim: int = 64, mini_batch_size: int = 64,
                      remat_group_size: int = 16, devices=None) -> dict[str, dict[str, int]]:
    """Per-device bytes of one TTT op's forward + backward, compiled ahead of time.

    Compares the scan on one device, heads sharded over all devices ("tensor": each holds
    H / n heads of the whole sequence) and context-parallel ("context": each holds every head
    for L / n tokens). Inputs arrive in each variant's own layout. Returns
    {variant: {"temp": ..., "argument": ..., "output": ...}} from `memory_analysis()`.
    """
    import numpy as np
    from jax.sharding import Mesh, NamedSharding

    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    f32 = jnp.float32
    shapes = dict(q=(batch, heads, length, head_dim), k=(batch, heads, length, head_dim),
                  v=(batch, heads, length, head_dim), eta=(batch, heads, length))
    shapes.update({key: fn(heads, head_dim) for key, fn in ttt_ops.PARAM_SHAPES[kind].items()})
    op = ttt_ops.ttt_mlp if kind == "mlp" else ttt_ops.ttt_linear

    def loss(fn):
        def f(args):
            p = {key: args[key] for key in ttt_ops.PARAM_SHAPES[kind]}
            return jnp.sum(fn(args["q"], args["k"], args["v"], args["eta"], p).astype(f32) ** 2)
        return jax.grad(f)

    def measure(fn, mesh=None, seq_spec=None, param_spec=None):
        def struct(key, shape):
            if mesh is None:
                return jax.ShapeDtypeStruct(shape, f32)
            spec = param_spec if key in ttt_ops.PARAM_SHAPES[kind] else P(*seq_spec[:len(shape)])
            return jax.ShapeDtypeStruct(shape, f32, sharding=NamedSharding(mesh, spec))
        args = {key: struct(key, shape) for key, shape in shapes.items()}
        stats = jax.jit(loss(fn)).lower(args).compile().memory_analysis()
        return {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
                "output": stats.output_size_in_bytes}

    kwargs = dict(mini_batch_size=mini_batch_size, remat_group_size=remat_group_size)
    one = functools.partial(op, **kwargs)
    tensor_mesh = Mesh(np.asarray(devices).reshape(n), ("tensor",))
    context_mesh = Mesh(np.asarray(devices).reshape(n), ("context",))
    context = functools.partial(ttt_context_parallel, kind, axis_name="context", mesh=context_mesh,
                                **kwargs)
    return {
        "one device": measure(one),
        f"heads over tensor ({n})": measure(one, tensor_mesh, P(None, "tensor", None, None),
                                            P("tensor")),
        f"context parallel ({n})": measure(context, context_mesh, P(None, None, "context", None),
                                           P()),
    }


def layer_memory_comparison(kind: ttt_ops.Kind = "mlp", *, batch: int = 1, heads: int = 8,
                            length: int = 16384, head_dim: int = 64, mini_batch_size: int = 64,
                            devices=None) -> dict[str, dict[str, int]]:
    """Per-device bytes of one TTT layer's (`tttjax.layers.ttt`) forward + backward.

    Gradients w.r.t. the layer input and every parameter, compiled ahead of time on n devices:
    heads over `tensor` with the input replicated (Megatron layout), heads over `tensor` with
    the sequence sharded over `tensor` outside the mixer (the 5B config's rules: the layer
    reshards to heads and back), and context-parallel over `context` (the sequence stays
    sharded; `context_axis` set). Same keys as `memory_comparison`.
    """
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding

    from tttjax import sharding
    from tttjax.layers.ttt import TTTLinear, TTTMLP  # the layer builds on this module

    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    layer_cls = TTTMLP if kind == "mlp" else TTTLinear
    width = heads * head_dim

    def measure(axis, rules, x_spec, context_axis=None):
        mesh = Mesh(np.asarray(devices).reshape(n), (axis,))
        layer = layer_cls(width, heads, mini_batch_size=mini_batch_size,
                          context_axis=context_axis, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(layer)

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            shardings = sharding.state_shardings(state, mesh, rules)
            state = jax.device_put(state, shardings)  # parameters are small; x is abstract
            x = jax.ShapeDtypeStruct((batch, length, width), jnp.float32,
                                     sharding=NamedSharding(mesh, x_spec))
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(state, x).lower().compile()
        stats = compiled.memory_analysis()
        return {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
                "output": stats.output_size_in_bytes}

    seq_over = lambda axis: sharding.merge_rules([("activation_length", axis)])  # noqa: E731
    return {
        f"heads over tensor ({n}), x replicated": measure("tensor", sharding.DEFAULT_RULES, P()),
        f"heads over tensor ({n}), x seq-sharded": measure("tensor", seq_over("tensor"),
                                                          P(None, "tensor")),
        f"context parallel ({n})": measure("context", seq_over("context"), P(None, "context"),
                                           context_axis="context"),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=memory_comparison.__doc__.splitlines()[0])
    parser.add_argument("--kind", default="mlp", choices=["mlp", "linear"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mini-batch", type=int, default=64)
    parser.add_argument("--layer", action="store_true",
                        help="the whole TTT layer (projections, norms) instead of the op")
    cli = parser.parse_args()
    compare = layer_memory_comparison if cli.layer else memory_comparison
    result = compare(cli.kind, heads=cli.heads, length=cli.length, head_dim=cli.head_dim,
                     mini_batch_size=cli.mini_batch)
    print(f"TTT-{cli.kind} {'layer' if cli.layer else 'op'} fwd+bwd, B=1, H={cli.heads}, "
          f"L={cli.length}, d={cli.head_dim}, b={cli.mini_batch}: per-device MiB")
    for variant, stats in result.items():
        print(f"  {variant:40s}" + "  ".join(f"{k} {v / 2**20:8.1f}" for k, v in stats.items()))
