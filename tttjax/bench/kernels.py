"""Benchmark of the Pallas TTT kernels against the XLA ops at the 5B layer shape.

    python -m tttjax.bench kernels [--lengths 17550,49950,98550,163350,341550] [--heads 48]
        [--head-dim 64] [--kinds mlp,linear] [--repeats 5] [--csv out.csv]
    python -m tttjax.bench kernels --interpret --lengths 64 --heads 1 --head-dim 16 \\
        --mini-batch 16 --matmul-size 128 --repeats 1        # CPU smoke run (interpret mode)
    python -m tttjax.bench kernels --topology v5p-8 [--lengths 17550,85050,341550] \\
        [--tensor 4] [--impls xla,pallas]                    # TPU compiler on any host

For each kind (TTT-MLP, b = 64; TTT-Linear, b = 16 per docs/design.md §1) and sequence length
(default: the five training stages, 13..253 latent frames x 1350 tokens, rounded up to whole
mini-batches) it times forward and forward+backward of `impl="xla"` and `impl="pallas"`
(medians after a warm-up, bf16 q/k/v/eta, float32 params), checks the kernel's z and gradients
against the XLA op's, and reports achieved matmul TFLOP/s as a fraction of a measured bf16
matmul rate. FLOPs counted are the algorithm's matmuls (the same count for both impls: forward
14*b*d*F per mini-batch and head for TTT-MLP, 6*b*d*d for TTT-Linear; backward twice that),
not what either impl recomputes. Out-of-memory configurations are reported, not fatal.

`--topology NAME` (a TPU slice, `tttjax.tpu_topology`; needs libtpu, runs on a CPU host) times
nothing: it compiles fwd and fwd+bwd of both impls with the real TPU compiler, as the DiT calls
the op (q/k/v from [B, L, H*d] projections, heads over the mesh axis `tensor` of size
`--tensor`, one sequence per chip over `data`, inside `jax.set_mesh`, so the kernel runs in its
`shard_map`), and prints per chip: HBM from `memory_analysis` (arguments, temporaries,
outputs), the kernel's VMEM estimate and the limit it asks Mosaic for, and `cost_analysis`
FLOPs / bytes accessed next to the algorithm's matmul FLOPs. Figures are *compiled, not run*.
The XLA scan compiles slowly at large L on a small host (minutes per row): the default lengths
are two stages; pass `--lengths` (e.g. 17550,85050,341550) or `--impls pallas`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import jax
import jax.numpy as jnp

from tttjax.bench.flops import ttt_inner_flops
from tttjax.bench.ops import print_rows
from tttjax.bench.timing import median_time
from tttjax.command_line import ArgumentParser
from tttjax.ops import ttt

_OPS = {"mlp": (ttt.ttt_mlp, 64), "linear": (ttt.ttt_linear, 16)}
_STAGE_TOKENS = "17550,49950,98550,163350,341550"  # 13/37/73/121/253 latent frames x 1350
_TOPOLOGY_TOKENS = "17550,85050"                    # 13/63 latent frames x 1350
_GIB = 2**30


def matmul_flops(kind, length, heads, d, b, backward):
    return (3 if backward else 1) * ttt_inner_flops(kind, length // b * b, heads, d)


def measure_matmul_rate(n, repeats, dtype=jnp.bfloat16):
    """FLOP/s of an n x n x n matmul in `dtype` (median of `repeats` after a warm-up)."""
    keys = jax.random.split(jax.random.key(1))
    a = jax.random.normal(keys[0], (n, n), dtype)
    b = jax.random.normal(keys[1], (n, n), dtype)
    fn = jax.jit(jnp.matmul).lower(a, b).compile()
    return 2 * n**3 / median_time(fn, (a, b), repeats)


def _inputs(kind, length, heads, d, dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    shape = (1, heads, length, d)

    def unit(key):
        x = jax.random.normal(key, shape, jnp.float32)
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    q, k = unit(keys[0]), unit(keys[1])
    v = jax.random.normal(keys[2], shape, dtype)
    eta = (0.1 / d * jax.nn.sigmoid(jax.random.normal(keys[3], shape[:3]))).astype(dtype)
    params = {name: 0.02 * jax.random.normal(keys[4], fn(heads, d))
              for name, fn in ttt.PARAM_SHAPES[kind].items()}
    params["ln_weight"] = jnp.ones((heads, d))
    return q, k, v, eta, params


def _rel_err(a, ref):
    a, ref = (jnp.asarray(x, jnp.float32) for x in (a, ref))
    return float(jnp.max(jnp.abs(a - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def run(kinds, lengths, heads, d, repeats, *, mini_batch=None, remat_group_size=16,
        kernel_impl="pallas", matmul_rate, dtype=jnp.bfloat16):
    """Yields one dict per (kind, L, impl)."""
    for kind in kinds:
        op, default_b = _OPS[kind]
        b = mini_batch or default_b
        for tokens in lengths:
            length = -(-tokens // b) * b
            args = _inputs(kind, length, heads, d, dtype)
            results, times = {}, {}
            for impl in ("xla", kernel_impl):
                def fwd(q, k, v, eta, p, impl=impl):
                    return op(q, k, v, eta, p, mini_batch_size=b,
                              remat_group_size=remat_group_size, impl=impl)

                def loss(q, k, v, eta, p, fwd=fwd):
                    return 0.5 * jnp.sum(jnp.square(fwd(q, k, v, eta, p).astype(jnp.float32)))

                row = {"kind": kind, "impl": impl, "L": length, "H": heads, "d": d, "b": b}
                try:
                    f = jax.jit(fwd).lower(*args).compile()
                    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
                    t_f, t_fb = median_time(f, args, repeats), median_time(fb, args, repeats)
                    results[impl] = (f(*args), fb(*args))
                    times[impl] = (t_f, t_fb)
                except Exception as err:  # noqa: BLE001 - report OOM and carry on
                    if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                        raise
                    row.update(fwd_ms=float("nan"), fwd_bwd_ms=float("nan"), note="OOM")
                    yield row
                    continue
                for name, t, backward in (("fwd", t_f, False), ("fwd_bwd", t_fb, True)):
                    rate = matmul_flops(kind, length, heads, d, b, backward) / t
                    row[f"{name}_ms"] = 1e3 * t
                    row[f"{name}_tflops"] = rate / 1e12
                    row[f"{name}_frac_of_matmul"] = rate / matmul_rate
                if impl != "xla" and "xla" in times:
                    (z_x, g_x), (z_k, g_k) = results["xla"], results[impl]
                    row["speedup_fwd"] = times["xla"][0] / t_f
                    row["speedup_fwd_bwd"] = times["xla"][1] / t_fb
                    row["z_rel_err"] = _rel_err(z_k, z_x)
                    row["grad_rel_err"] = max(_rel_err(a, r) for a, r in
                                              zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)))
                yield row


def compile_rows(topology, kinds, lengths, *, heads, tensor, d, mini_batch=None,
                 remat_group_size=16, impls=("xla", "pallas"), dtype=jnp.bfloat16):
    """Compiles fwd and fwd+bwd for the TPU slice `topology` (no TPU needed); yields one dict
    per (kind, L, impl, mode) with per-chip memory and cost. `heads` is the layer's total H,
    split over a mesh axis `tensor` of size `tensor`; `data` takes the remaining chips, one
    sequence each."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_kernels import ttt_tpu
    from tttjax import sharding, tpu_topology

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor},
                              tpu_topology.devices(topology))
    bsz = mesh.shape["data"]
    local_heads = heads // tensor
    for kind in kinds:
        op, default_b = _OPS[kind]
        b = mini_batch or default_b
        for tokens in lengths:
            length = -(-tokens // b) * b
            n = length // b
            group = min(remat_group_size, n)
            proj = jax.ShapeDtypeStruct((bsz, length, heads * d), dtype,
                                        sharding=NamedSharding(mesh, P("data", None, "tensor")))
            eta = jax.ShapeDtypeStruct((bsz, heads, length), dtype,
                                       sharding=NamedSharding(mesh, P("data", "tensor")))
            params = {name: jax.ShapeDtypeStruct(fn(heads, d), jnp.float32,
                                                 sharding=NamedSharding(mesh, P("tensor")))
                      for name, fn in ttt.PARAM_SHAPES[kind].items()}
            args = (proj, proj, proj, eta, params)
            for impl in impls:
                def fwd(q, k, v, eta, p, impl=impl):
                    # As the layer: [B, L, H*d] projections -> [B, H, L, d] -> op -> [B, L, H*d].
                    q, k, v = (x.reshape(bsz, length, heads, d).transpose(0, 2, 1, 3)
                               for x in (q, k, v))
                    z = op(q, k, v, eta, p, mini_batch_size=b, remat_group_size=remat_group_size,
                           impl=impl)
                    return z.transpose(0, 2, 1, 3).reshape(bsz, length, heads * d)

                def loss(q, k, v, eta, p, fwd=fwd):
                    return 0.5 * jnp.sum(jnp.square(fwd(q, k, v, eta, p).astype(jnp.float32)))

                for mode, fn in (("fwd", fwd),
                                 ("fwd_bwd", jax.grad(loss, argnums=(0, 1, 2, 3, 4)))):
                    row = {"topology": topology, "kind": kind, "impl": impl, "L": length,
                           "mode": mode, "heads_per_chip": local_heads, "d": d, "b": b,
                           "group": group}
                    if impl != "xla":
                        row["vmem_est_mib"] = ttt_tpu.vmem_bytes(kind, d, b, group) / 2**20
                        row["vmem_limit_mib"] = ttt_tpu.vmem_limit_bytes(kind, d, b, group) / 2**20
                    row["analytic_gflop"] = matmul_flops(
                        kind, length, local_heads, d, b, mode == "fwd_bwd") / 1e9
                    start = time.perf_counter()
                    try:
                        with jax.set_mesh(mesh):
                            compiled = jax.jit(fn).lower(*args).compile()
                    except Exception as err:  # noqa: BLE001 - report what the compiler refuses
                        message = str(err)
                        if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
                            raise
                        row["note"] = "does not fit: " + message.strip().splitlines()[0][:160]
                        yield row
                        continue
                    row["compile_s"] = time.perf_counter() - start
                    mem = compiled.memory_analysis()
                    row["args_gib"] = mem.argument_size_in_bytes / _GIB
                    row["temps_gib"] = mem.temp_size_in_bytes / _GIB
                    row["out_gib"] = mem.output_size_in_bytes / _GIB
                    cost = compiled.cost_analysis() or {}
                    row["xla_gflop"] = float(cost.get("flops", float("nan"))) / 1e9
                    row["gb_accessed"] = float(cost.get("bytes accessed", float("nan"))) / 1e9
                    row["mosaic_calls"] = compiled.as_text().count("tpu_custom_call")
                    yield row


def _main_topology(args, parser, kinds, lengths):
    from tttjax import tpu_topology

    if args.interpret:
        parser.error("--topology compiles for TPUs and runs nothing; drop --interpret")
    impls = [x for x in args.impls.split(",") if x]
    if not impls or any(x not in ("xla", "pallas") for x in impls):
        parser.error(f"--impls must be a comma-separated subset of xla,pallas, got {args.impls!r}")
    try:
        chip = tpu_topology.chip(args.topology)
        devices = tpu_topology.devices(args.topology)
    except ValueError as err:
        parser.error(str(err))
    if args.heads % args.tensor or len(devices) % args.tensor:
        parser.error(f"--heads {args.heads} and the {len(devices)} chips of {args.topology} must "
                     f"both be divisible by --tensor {args.tensor}")
    print(f"# {datetime.date.today()} TPU compiler on a CPU host: compiled, not run. "
          f"{args.topology}: {len(devices)} x {devices[0].device_kind} "
          f"({chip.hbm_bytes / _GIB:.0f} GiB HBM each), jax {jax.__version__}")
    print(f"# per chip: one sequence, {args.heads // args.tensor} of {args.heads} heads (tensor = "
          f"{args.tensor}), d = {args.head_dim}, remat_group_size {args.remat_group_size}, bf16 "
          "q/k/v/eta, float32 params. HBM (GiB): memory_analysis; VMEM (MiB): the kernel's "
          "estimate and the limit it asks Mosaic for")
    print("# FLOPs per chip: analytic = the algorithm's matmuls; xla = cost_analysis (the kernels "
          "enter it with their cost estimates, recomputation included; XLA counts a while loop's "
          "body once, not per iteration, so the XLA scan's figure is far below its work)")
    print_rows(("kind", "impl", "L", "mode", "args_gib", "temps_gib", "out_gib", "vmem_est_mib",
                "vmem_limit_mib", "analytic_gflop", "xla_gflop", "gb_accessed", "compile_s", "note"),
               compile_rows(args.topology, kinds, lengths, heads=args.heads, tensor=args.tensor,
                            d=args.head_dim, mini_batch=args.mini_batch,
                            remat_group_size=args.remat_group_size, impls=impls),
               args.csv, float_format=".3g")
    return 0


def main(argv=None):
    parser = ArgumentParser(prog="python -m tttjax.bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp,linear")
    parser.add_argument("--lengths", default=None,
                        help="token counts, each rounded up to a whole number of mini-batches "
                        f"(default {_STAGE_TOKENS}; with --topology {_TOPOLOGY_TOKENS})")
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mini-batch", type=int, default=None,
                        help="override b for every kind (default: 64 for mlp, 16 for linear)")
    parser.add_argument("--remat-group-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=8192,
                        help="n of the n x n x n bf16 matmul whose rate is the reference")
    parser.add_argument("--interpret", action="store_true",
                        help="run the kernels in Pallas interpret mode (any platform; for smoke tests)")
    parser.add_argument("--topology", default=None,
                        help="compile (not run) for this TPU slice, e.g. v5p-8 or v6e-8, with the "
                        "TPU compiler on this host (needs libtpu); prints per-chip memory and cost")
    parser.add_argument("--tensor", type=int, default=4,
                        help="with --topology: chips that split the heads (5B: 48 heads / 4)")
    parser.add_argument("--impls", default="xla,pallas",
                        help="with --topology: which impls to compile (xla, pallas)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = _TOPOLOGY_TOKENS if args.topology else _STAGE_TOKENS
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    kinds = [x for x in args.kinds.split(",") if x]
    if not kinds or any(x not in _OPS for x in kinds):
        parser.error(f"--kinds must be a comma-separated subset of mlp,linear, got {args.kinds!r}")
    if args.topology:
        return _main_topology(args, parser, kinds, lengths)
    platform = jax.default_backend()
    if not args.interpret and platform not in ("tpu", "gpu", "cuda", "rocm"):
        parser.error(f"the Pallas kernels need a TPU or GPU, JAX runs on {platform!r}; "
                     "pass --interpret for a (slow) smoke run")

    device = jax.devices()[0]
    matmul_rate = measure_matmul_rate(args.matmul_size, args.repeats)
    print(f"# {datetime.date.today()} device: {device.device_kind} ({platform}), jax {jax.__version__}")
    print(f"# bf16 matmul {args.matmul_size}^3: {matmul_rate / 1e12:.1f} TFLOP/s measured")
    kernel_impl = "pallas_interpret" if args.interpret else "pallas"
    print_rows(("kind", "impl", "L", "b", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
                "fwd_frac_of_matmul", "fwd_bwd_frac_of_matmul", "speedup_fwd", "speedup_fwd_bwd",
                "z_rel_err", "grad_rel_err", "note"),
               run(kinds, lengths, args.heads, args.head_dim, args.repeats,
                   mini_batch=args.mini_batch, remat_group_size=args.remat_group_size,
                   kernel_impl=kernel_impl, matmul_rate=matmul_rate),
               args.csv, float_format=".3g")
    return 0


if __name__ == "__main__":
    sys.exit(main())
