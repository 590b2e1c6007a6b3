"""Benchmark of the Pallas TTT kernels against the XLA ops at the 5B layer shape.

    python -m tttjax.bench kernels [--lengths 17550,49950,98550,163350,341550] [--heads 48]
        [--head-dim 64] [--kinds mlp,linear] [--repeats 5] [--csv out.csv]
    python -m tttjax.bench kernels --interpret --lengths 64 --heads 1 --head-dim 16 \\
        --mini-batch 16 --matmul-size 128 --repeats 1        # CPU smoke run (interpret mode)

For each kind (TTT-MLP, b = 64; TTT-Linear, b = 16 per SPEC section 1) and sequence length
(default: the five training stages, 13..253 latent frames x 1350 tokens, rounded up to whole
mini-batches) it times forward and forward+backward of `impl="xla"` and `impl="pallas"`
(medians after a warm-up, bf16 q/k/v/eta, float32 params), checks the kernel's z and gradients
against the XLA op's, and reports achieved matmul TFLOP/s as a fraction of a measured bf16
matmul rate. FLOPs counted are the algorithm's matmuls (the same count for both impls: forward
14*b*d*F per mini-batch and head for TTT-MLP, 6*b*d*d for TTT-Linear; backward twice that),
not what either impl recomputes. Out-of-memory configurations are reported, not fatal.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import jax
import jax.numpy as jnp

from tttjax.bench.flops import ttt_inner_flops
from tttjax.bench.table import MarkdownTable, write_csv
from tttjax.bench.timing import median_time
from tttjax.command_line import ArgumentParser
from tttjax.ops import ttt

_OPS = {"mlp": (ttt.ttt_mlp, 64), "linear": (ttt.ttt_linear, 16)}
_STAGE_TOKENS = "17550,49950,98550,163350,341550"  # 13/37/73/121/253 latent frames x 1350


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


def main(argv=None):
    parser = ArgumentParser(prog="python -m tttjax.bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp,linear")
    parser.add_argument("--lengths", default=_STAGE_TOKENS,
                        help="token counts, each rounded up to a whole number of mini-batches")
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
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    kinds = [x for x in args.kinds.split(",") if x]
    if not kinds or any(x not in _OPS for x in kinds):
        parser.error(f"--kinds must be a comma-separated subset of mlp,linear, got {args.kinds!r}")
    platform = jax.default_backend()
    if not args.interpret and platform not in ("tpu", "gpu", "cuda", "rocm"):
        parser.error(f"the Pallas kernels need a TPU or GPU, JAX runs on {platform!r}; "
                     "pass --interpret for a (slow) smoke run")

    device = jax.devices()[0]
    matmul_rate = measure_matmul_rate(args.matmul_size, args.repeats)
    print(f"# {datetime.date.today()} device: {device.device_kind} ({platform}), jax {jax.__version__}")
    print(f"# bf16 matmul {args.matmul_size}^3: {matmul_rate / 1e12:.1f} TFLOP/s measured")
    table = MarkdownTable(("kind", "impl", "L", "b", "fwd_ms", "fwd_bwd_ms", "fwd_tflops",
                           "fwd_bwd_tflops", "fwd_frac_of_matmul", "fwd_bwd_frac_of_matmul",
                           "speedup_fwd", "speedup_fwd_bwd", "z_rel_err", "grad_rel_err", "note"),
                          float_format=".3g")
    rows = []
    kernel_impl = "pallas_interpret" if args.interpret else "pallas"
    for row in run(kinds, lengths, args.heads, args.head_dim, args.repeats,
                   mini_batch=args.mini_batch, remat_group_size=args.remat_group_size,
                   kernel_impl=kernel_impl, matmul_rate=matmul_rate):
        rows.append(row)
        table.row(row)
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
