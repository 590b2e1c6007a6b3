"""Benchmark of the TTT ops: forward and forward+backward time, tokens/s and memory vs L.

    python -m tttjax.bench ops [--lengths 4096,16384,65536] [--heads 4] [--head-dim 64]
                               [--repeats 3] [--no-reference] [--paper-op PATH]
                               [--devices N] [--csv out.csv]

Memory is XLA's compiled memory analysis of each jitted function (arguments + outputs +
temporaries, the peak a device needs), so growth with L can be read off exactly, whatever
else the machine is running. Times are medians of `--repeats` runs after a warm-up.

Forward + backward is the gradient of sum(z^2) w.r.t. q, k, v, eta and every parameter. Unless
`--no-reference`, the previous implementation of its gradient (JAX autodiff through the
closed-form steps in `jax.checkpoint` groups, `ttt._ttt(..., vjp="autodiff")`) is timed in
the same run, its calls alternating with the current op's, and `vs_autodiff` is the ratio of
the two medians (below 1: the current op is faster), which stays meaningful on a busy machine.

With `--paper-op PATH` (a checkout of the paper's code, `test-time-training/ttt-video-dit`, or
any folder holding its `ttt/models/ssm/ops` package; never a dependency of tttjax), the
paper's pure-PyTorch op (`ttt_mlp` / `ttt_linear`, its mini-batch step under torch.compile,
checkpoint groups of `--remat-group-size`) runs forward + backward of the same loss on the
same inputs in the same process, its calls alternating with tttjax's, and `vs_paper` is the
ratio of the medians (below 1: tttjax is faster). Its inputs are what its layer passes: the
blocks of q, k and target + k, eta / b per row; the target's normalisation is inside tttjax's
timed op and outside the paper's.

With `--devices N` the inputs are placed with their heads split over N devices, so each
device runs the op on H / N heads (as the layers' heads are split over the mesh's `tensor`
axis, `tttjax.sharding`). On CPU the benchmark first asks JAX for N CPU devices
(`jax_num_cpu_devices`, so it must start JAX itself): XLA:CPU runs this op's small matmuls
and its independent scans on one core, one after another, while several CPU devices run side
by side, one core each.

FLOPs are analytic, matmuls only (`matmul_flops`): per mini-batch and (batch, head), TTT-MLP
runs 7 matmuls of b x d x 4d forward and 28 for forward + backward (forward, the group's
recomputation, 14 in the backward), TTT-Linear 3 and 12 of b x d x d. `matmul_frac` is the
forward + backward FLOP rate over this machine's float32 matmul rate (`matmul_GFLOP_s`: one
1024 x 1024 x 1024 matmul, its calls alternating with the op's in the same rounds, so a busy
machine slows both alike).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from tttjax.bench.table import MarkdownTable, write_csv
from tttjax.bench.timing import median_time, peak_bytes
from tttjax.command_line import ArgumentParser, UsageError
from tttjax.ops import ttt

_OPS = {"ttt_mlp": (ttt.ttt_mlp, "mlp", 64), "ttt_linear": (ttt.ttt_linear, "linear", 16)}
_MATMULS = {"mlp": (7, 28), "linear": (3, 12)}  # per mini-batch and (batch, head): fwd, fwd+bwd


def print_rows(columns, rows, csv_path=None, float_format=".2f"):
    """Prints each row of the iterable `rows` as it comes (a Markdown table of `columns`), then
    writes them all to `csv_path` if given. Returns the rows (a list). Shared by the op and
    kernel benchmarks."""
    table = MarkdownTable(columns, float_format=float_format)
    done = []
    for row in rows:
        done.append(row)
        table.row(row)
    if csv_path:
        write_csv(done, csv_path)
    return done


def matmul_flops(kind, bsz, heads, length, d, b):
    """Analytic matmul FLOPs (forward, forward + backward) of the TTT op (module docstring)."""
    width = 4 * d if kind == "mlp" else d
    per_matmul = 2 * b * d * width * bsz * heads * (length // b)
    fwd, fwd_bwd = _MATMULS[kind]
    return fwd * per_matmul, fwd_bwd * per_matmul


def _matmul(n=1024):
    """A compiled n x n x n float32 matmul, its argument and its FLOPs."""
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    return jax.jit(lambda a: a @ a).lower(x).compile(), x, 2 * n**3


def matmul_rate(repeats=5, n=1024):
    """This machine's float32 matmul rate (FLOP/s): the median of n x n x n jitted matmuls."""
    f, x, flops = _matmul(n)
    return flops / median_time(f, (x,), repeats)


def interleaved_medians(fns, args, repeats):
    """Median seconds of each of `fns(*args)`, their calls alternating (after one warm-up each)."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def paper_module(path, kind):
    """The paper's `ttt.models.ssm.ops.ttt_{kind}` module from the checkout at `path`; raises
    `UsageError` naming what is missing (the checkout's own imports need torch and its
    requirements, e.g. wandb)."""
    import importlib

    sys.path.insert(0, str(path))
    try:
        return importlib.import_module(f"ttt.models.ssm.ops.ttt_{kind}")
    except ImportError as err:
        raise UsageError(f"--paper-op {path}: cannot import ttt.models.ssm.ops.ttt_{kind} from "
                         f"there ({err}); give the root of a ttt-video-dit checkout and install "
                         "what its imports need") from err
    finally:
        sys.path.remove(str(path))


def paper_op(path, kind, args, b, remat_group_size):
    """A callable running the paper's PyTorch op forward + backward of sum(z^2) (module doc)."""
    import numpy as np
    import torch

    ops = paper_module(path, kind)
    q, k, v, eta, params = args
    bsz, h, length, d = q.shape
    n = length // b
    y = ttt.reconstruction_target(k, v, params["ln_weight"][:, None, :],
                                  params["ln_bias"][:, None, :])
    tensor = lambda x: torch.tensor(np.asarray(x, np.float32))  # noqa: E731
    blocks = lambda x: tensor(x).reshape(bsz, h, n, b, d)  # noqa: E731
    eta_rows = (tensor(eta).reshape(bsz, h, n, 1, b) / b).repeat(1, 1, 1, b, 1)
    state = [tensor(jnp.broadcast_to(params[key], (bsz,) + params[key].shape))
             for key in ttt.STATE_KEYS[kind]]
    leaves = [blocks(k), blocks(q), blocks(y + k), eta_rows, tensor(params["ln_weight"]),
              tensor(params["ln_bias"]), *state]
    fn = getattr(ops, f"ttt_{kind}")

    def step(*_):
        xs = [t.clone().requires_grad_(True) for t in leaves]
        z = fn(*xs, remat_group_size)
        (z * z).sum().backward()
        return [x.grad for x in xs]

    return step


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


def shard_heads(args, devices):
    """(q, k, v, eta, params) placed with their heads split over `devices` (a 1-D mesh)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(list(devices), ("heads",))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    q, k, v, eta, params = args
    return (*(put(x, P(None, "heads")) for x in (q, k, v, eta)),
            {key: put(x, P("heads")) for key, x in params.items()})


def run(lengths, heads, d, repeats, remat_group_size=16, dtype=jnp.float32, reference=True,
        paper_path=None, ops=tuple(_OPS), devices=1):
    """Yields one dict per (op, L) with times (s), tokens/s, FLOP rates and memory (MiB).
    `devices` > 1: the heads are split over that many devices (memory is then per device)."""
    for name, (op, kind, b) in _OPS.items():
        if name not in ops:
            continue
        for length in lengths:
            args = _inputs(kind, length, heads, d, dtype)
            if devices > 1:
                args = shard_heads(args, jax.devices()[:devices])

            def fwd(q, k, v, eta, p, op=op, b=b):
                return op(q, k, v, eta, p, mini_batch_size=b, remat_group_size=remat_group_size)

            def fwd_autodiff(q, k, v, eta, p, kind=kind, b=b):
                return ttt._ttt(kind, q, k, v, eta, p, mini_batch_size=b,
                                remat_group_size=remat_group_size, causal=False,
                                token_idx_offset=None, initial_state=None, return_state=False,
                                return_inner_loss=False, vjp="autodiff")

            def grad_of(f, args=args):
                loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)  # noqa: E731
                return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()

            # One compile per function serves both the timing and the memory analysis.
            f = jax.jit(fwd).lower(*args).compile()
            fb = grad_of(fwd)
            t_f = median_time(f, args, repeats)
            # The matmul rate is timed in the same rounds, so load on a shared machine moves
            # it and the op's time together.
            mm, mm_x, mm_flops = _matmul()
            fns = [fb, lambda *_: mm(mm_x)] + ([grad_of(fwd_autodiff)] if reference else [])
            if paper_path:
                fns.append(paper_op(paper_path, kind, args, b, remat_group_size))
            times = interleaved_medians(fns, args, repeats) + [float("nan")] * 2
            t_fb, rate = times[0], mm_flops / times[1]
            t_ref = times[2] if reference else float("nan")
            t_paper = times[3 if reference else 2] if paper_path else float("nan")
            flops_f, flops_fb = matmul_flops(kind, 1, heads, length, d, b)
            io_bytes = sum(x.nbytes for x in jax.tree.leaves(args))
            yield {
                "op": name, "L": length, "H": heads, "d": d, "b": b, "devices": devices,
                "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_fb,
                "autodiff_fwd_bwd_ms": 1e3 * t_ref, "vs_autodiff": t_fb / t_ref,
                "paper_fwd_bwd_ms": 1e3 * t_paper, "vs_paper": t_fb / t_paper,
                "fwd_tok_s": length / t_f, "fwd_bwd_tok_s": length / t_fb,
                "fwd_bwd_GFLOP": flops_fb / 1e9,
                "fwd_GFLOP_s": flops_f / t_f / 1e9, "fwd_bwd_GFLOP_s": flops_fb / t_fb / 1e9,
                "matmul_GFLOP_s": rate / 1e9, "matmul_frac": flops_fb / t_fb / rate,
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
    parser.add_argument("--no-reference", action="store_true",
                        help="do not time the previous (autodiff) gradient alongside")
    parser.add_argument("--paper-op", default=None, metavar="PATH",
                        help="also time the paper's PyTorch op from this ttt-video-dit checkout "
                        "(needs torch; see above)")
    parser.add_argument("--ops", default="ttt_mlp,ttt_linear",
                        help="comma-separated subset of ttt_mlp,ttt_linear")
    parser.add_argument("--devices", type=int, default=1,
                        help="split the heads over this many devices (default 1). On CPU the "
                        "benchmark asks JAX for that many CPU devices: XLA:CPU runs one op's "
                        "scans on one core, several devices run side by side")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.heads % args.devices:
        parser.error(f"--devices must be >= 1 and divide --heads ({args.heads}), got "
                     f"{args.devices}")
    if args.devices > 1:
        try:  # only possible before JAX starts its backends; else the devices it has count
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError:
            pass
        if jax.device_count() < args.devices:
            parser.error(f"--devices {args.devices}: JAX has only {jax.device_count()} "
                         f"{jax.default_backend()} device(s); run in a fresh process (on CPU) "
                         "or with fewer devices")
    ops = tuple(x for x in args.ops.split(",") if x)
    if not ops or any(x not in _OPS for x in ops):
        parser.error(f"--ops must be a comma-separated subset of {','.join(_OPS)}, "
                     f"got {args.ops!r}")
    if args.paper_op and not os.path.isdir(
            os.path.join(args.paper_op, "ttt", "models", "ssm", "ops")):
        parser.error(f"--paper-op {args.paper_op}: no ttt/models/ssm/ops folder there; give the "
                     "root of a test-time-training/ttt-video-dit checkout")
    for kind in ops if args.paper_op else ():
        try:     # before anything is timed: an unimportable checkout is a usage error
            paper_module(args.paper_op, kind.removeprefix("ttt_"))
        except UsageError as err:
            parser.error(str(err))
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")

    print(f"# device: {jax.devices()[0].device_kind} x{jax.device_count()}, backend "
          f"{jax.default_backend()}; the heads split over {args.devices}")
    print(f"# float32 matmul rate (1024^3, median, before the rows): {matmul_rate() / 1e9:.1f} "
          "GFLOP/s; each row's matmul_GFLOP_s is timed in the rounds of its own calls")
    rows = run(lengths, args.heads, args.head_dim, args.repeats, args.remat_group_size,
               reference=not args.no_reference, paper_path=args.paper_op, ops=ops,
               devices=args.devices)
    print_rows(("op", "L", "b", "devices", "fwd_ms", "fwd_bwd_ms", "autodiff_fwd_bwd_ms",
                "vs_autodiff", "paper_fwd_bwd_ms", "vs_paper", "fwd_bwd_tok_s", "fwd_bwd_GFLOP",
                "fwd_bwd_GFLOP_s", "matmul_GFLOP_s", "matmul_frac", "inputs_MiB", "fwd_peak_MiB",
                "fwd_bwd_peak_MiB"), rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
