"""What the parts of a TTT mini-batch step cost on this machine, one kind of operation at a time.

    python -m tttjax.bench step_parts [--heads 4] [--rows 16] [--dim 64] [--steps 256]
                                      [--per-step 12] [--repeats 15] [--csv out.csv]

Each part runs `--per-step` times per step, chained (each result feeds the next, so XLA can
neither drop nor merge them), inside a `lax.scan` of `--steps` steps on a float32 state of
[heads, rows, dim], as the TTT op's scans run their steps (`tttjax.ops.ttt`, defaults: the
TTT-Linear mini-batch of `python -m tttjax.bench ops`, b = 16, d = 64, 4 heads):

    head_dot   [H, b, d] x [H, d, d] per-head dot (HIGHEST precision), as the step's matmuls
    flat_dot   the same FLOPs as one [H b, d] x [d, d] dot
    row_sum    a row sum as a matmul with a ones column, and its use (x - mean)
    layer_norm an elementwise fusion with two row reductions (mean, mean square, rsqrt)

The parts' calls alternate in each round, so a busy machine slows them alike. `us_per_op` is
the median time of one scan over steps x per-step; GFLOP/s is given for the dots. Read with
the TTT op's own figures (`bench ops`): the step's analytic matmul FLOPs at the dots' rate
is the time its matmuls need, the rest of the op's time is its other operations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tttjax.bench.ops import interleaved_medians, print_rows
from tttjax.command_line import ArgumentParser

PARTS = ("head_dot", "flat_dot", "row_sum", "layer_norm")


def part_scan(part: str, heads: int, rows: int, dim: int, steps: int, per_step: int):
    """A jitted fn(state [heads, rows, dim] float32, w [heads, dim, dim]) -> state: `steps`
    scan steps of `per_step` chained operations of kind `part` (module docstring)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")

    def one(s, w):
        if part == "head_dot":
            return jnp.einsum("hbd,hde->hbe", s, w, precision="highest")
        if part == "flat_dot":
            flat = jnp.dot(s.reshape(heads * rows, dim), w[0], precision="highest")
            return flat.reshape(heads, rows, dim)
        if part == "row_sum":
            ones = jnp.full((dim, 1), 1.0 / dim, s.dtype)
            return s - jnp.einsum("hbd,do->hbo", s, ones, precision="highest")
        centred = s - jnp.mean(s, axis=-1, keepdims=True)
        return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True)
                                       + 1e-5)

    def body(s, _, w):
        for _ in range(per_step):
            s = one(s, w)
        return s, None

    return jax.jit(lambda s, w: jax.lax.scan(lambda c, x: body(c, x, w), s, None,
                                             length=steps)[0])


def dot_flops(part: str, heads: int, rows: int, dim: int) -> float:
    """FLOPs of one operation of `part` (0 for the parts that are not dots)."""
    return 2.0 * heads * rows * dim * dim if part in ("head_dot", "flat_dot") else 0.0


def run(heads=4, rows=16, dim=64, steps=256, per_step=12, repeats=15, parts=PARTS):
    """Yields one dict per part: part, us_per_op, GFLOP_s (NaN for non-dots)."""
    key_s, key_w = jax.random.split(jax.random.key(0))
    s = jax.random.normal(key_s, (heads, rows, dim), jnp.float32)
    # Orthogonal-ish scale keeps a chain of dots finite over many steps.
    w = jax.random.normal(key_w, (heads, dim, dim), jnp.float32) / jnp.sqrt(dim)
    fns = [part_scan(p, heads, rows, dim, steps, per_step) for p in parts]
    medians = interleaved_medians(fns, (s, w), repeats)
    for p, median in zip(parts, medians):
        per_op = median / (steps * per_step)
        flops = dot_flops(p, heads, rows, dim)
        yield {"part": p, "us_per_op": 1e6 * per_op,
               "GFLOP_s": flops / per_op / 1e9 if flops else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tttjax.bench step_parts",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16, help="mini-batch size b (default 16)")
    parser.add_argument("--dim", type=int, default=64, help="head dim d (default 64)")
    parser.add_argument("--steps", type=int, default=256, help="scan steps (default 256)")
    parser.add_argument("--per-step", type=int, default=12,
                        help="chained operations per step (default 12)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--csv", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    if min(args.heads, args.rows, args.dim, args.steps, args.per_step, args.repeats) < 1:
        parser.error("--heads, --rows, --dim, --steps, --per-step and --repeats must be >= 1")
    print(f"# device: {jax.devices()[0].platform} x{jax.device_count()}; state "
          f"[{args.heads}, {args.rows}, {args.dim}] float32, {args.steps} steps x "
          f"{args.per_step} chained operations, median of {args.repeats}", flush=True)
    print_rows(["part", "us_per_op", "GFLOP_s"],
               run(args.heads, args.rows, args.dim, args.steps, args.per_step, args.repeats),
               args.csv or None)
    return 0
