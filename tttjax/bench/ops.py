"""Benchmark of the TTT ops: forward and forward+backward time, tokens/s and memory vs L.

    python -m tttjax.bench ops [--lengths 4096,16384,65536] [--heads 4] [--head-dim 64]
                               [--repeats 3] [--csv out.csv]

Memory is XLA's compiled memory analysis of each jitted function (arguments + outputs +
temporaries, the peak a device needs), so growth with L can be read off exactly, whatever
else the machine is running. Times are medians of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from tttjax.bench.table import MarkdownTable, write_csv
from tttjax.bench.timing import median_time, peak_bytes
from tttjax.command_line import ArgumentParser
from tttjax.ops import ttt

_OPS = {"ttt_mlp": (ttt.ttt_mlp, "mlp", 64), "ttt_linear": (ttt.ttt_linear, "linear", 16)}


def _inputs(kind, length, heads, d, dtype):
    keys = jax.random.split(jax.random.key(0), 8)
    shape = (1, heads, length, d)
    unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(  # noqa: E731
        jax.random.normal(k, shape)).astype(dtype)
    q, k = unit(keys[0]), unit(keys[1])
    v = jax.random.normal(keys[2], shape, dtype)
    eta = jnp.full((1, heads, length), 0.1 / d, dtype)
    params = {name: 0.02 * jax.random.normal(keys[3], fn(heads, d))
              for name, fn in ttt.PARAM_SHAPES[kind].items()}
    params["ln_weight"] = jnp.ones((heads, d))
    return q, k, v, eta, params


def run(lengths, heads, d, repeats, remat_group_size=16, dtype=jnp.float32):
    """Yields one dict per (op, L) with times (s), tokens/s and memory (MiB)."""
    for name, (op, kind, b) in _OPS.items():
        for length in lengths:
            args = _inputs(kind, length, heads, d, dtype)

            def fwd(q, k, v, eta, p, op=op, b=b):
                return op(q, k, v, eta, p, mini_batch_size=b, remat_group_size=remat_group_size)

            def loss(q, k, v, eta, p, fwd=fwd):
                return jnp.sum(fwd(q, k, v, eta, p).astype(jnp.float32) ** 2)

            # One compile per function serves both the timing and the memory analysis.
            f = jax.jit(fwd).lower(*args).compile()
            fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
            t_f, t_fb = median_time(f, args, repeats), median_time(fb, args, repeats)
            io_bytes = sum(x.nbytes for x in jax.tree.leaves(args))
            yield {
                "op": name, "L": length, "H": heads, "d": d, "b": b,
                "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_fb,
                "fwd_tok_s": length / t_f, "fwd_bwd_tok_s": length / t_fb,
                "inputs_MiB": io_bytes / 2**20,
                "fwd_peak_MiB": peak_bytes(f) / 2**20,
                "fwd_bwd_peak_MiB": peak_bytes(fb) / 2**20,
            }


def main(argv=None):
    parser = ArgumentParser(prog="python -m tttjax.bench ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat-group-size", type=int, default=16)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")

    print(f"# device: {jax.devices()[0].device_kind} x{jax.device_count()}, backend {jax.default_backend()}")
    table = MarkdownTable(("op", "L", "b", "fwd_ms", "fwd_bwd_ms", "fwd_tok_s", "fwd_bwd_tok_s",
                           "inputs_MiB", "fwd_peak_MiB", "fwd_bwd_peak_MiB"), float_format=".1f")
    rows = []
    for row in run(lengths, args.heads, args.head_dim, args.repeats, args.remat_group_size):
        rows.append(row)
        table.row(row)
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
