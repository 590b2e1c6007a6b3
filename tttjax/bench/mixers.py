"""Every sequence mixer at one DiT layer's shape: time and memory vs L, relative to local attention.

    python -m tttjax.bench mixers [--width 256] [--heads 4] [--lengths 4096,8192,16384]
        [--mixers local,ttt_mlp,ttt_linear,gated_deltanet,mamba2,swa,full]
        [--local-window 1024] [--swa-window 2048] [--direction forward]
        [--full-impl chunked] [--full-max-length 16384] [--batch 1] [--repeats 3]
        [--dtype float32] [--csv mixers.csv] [--plot mixers.png]

Each mixer is the registry's layer (`tttjax.layers.registry.make_mixer`, the paper's defaults:
TTT-MLP b = 64, TTT-Linear b = 16, Mamba 2 d_state 128 / chunk 256, Gated DeltaNet chunk 64)
with all its projections, called as in the DiT slot (`mixer(x [B, L, D], rope=...)`).
`local` is attention inside non-overlapping windows of `--local-window` tokens, the analog
of the paper's local-attention-only model (windows over 1024 tokens use the same online-softmax
form as `--full-impl chunked`, so local and full attention run the same code); every other mixer's cost is reported relative to
it at the same L (the paper's Figure 6 compares whole models, so its ratios also carry the
MLPs and local attention that every variant shares; these are the mixers alone).

Forward is `jit(mixer)`; forward+backward is `jit(grad)` of a scalar loss with respect to
every parameter and the input. Times are medians of `--repeats` runs after a warm-up call
(`block_until_ready`). Memory is XLA's compiled memory analysis of the same executable
(arguments + outputs + temporaries - aliased), the peak one device needs, whatever else the
machine runs. Full attention above `--full-max-length` is skipped (its cost grows as L^2).
"""

from __future__ import annotations

import argparse
import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax import storage
from tttjax.bench.table import MarkdownTable, write_csv
from tttjax.bench.timing import median_time, peak_bytes
from tttjax.command_line import ArgumentParser
from tttjax.layers import registry
from tttjax.layers.attention_mixers import LocalAttention
from tttjax.ops.rope import rope_1d
from tttjax.optional_dependency import require

ALL_MIXERS = ("local",) + registry.mixer_names()


def build(name: str, width: int, heads: int, *, direction: str, dtype, local_window: int,
          swa_window: int, full_impl: str | None, seed: int = 0) -> nnx.Module:
    """The mixer `name` (a registry name or `local`) at the benchmark's settings."""
    if name == "local":
        return LocalAttention(width, heads, window=local_window, causal=direction == "causal",
                              dtype=dtype, rngs=nnx.Rngs(seed))
    cfg = registry.default_mixer_config(width, heads)
    cfg.direction = direction
    cfg.dtype = jnp.dtype(dtype).name
    cfg.swa.window = swa_window
    if full_impl is not None:
        cfg.full.impl = full_impl
    return registry.make_mixer(name, cfg, rngs=nnx.Rngs(seed))


def measure(mixer: nnx.Module, batch: int, length: int, repeats: int, dtype) -> dict:
    """Forward and forward+backward time (s) and compiled peak memory (bytes) of one mixer."""
    width = mixer.mixer.width if isinstance(mixer, registry.SumBidirectional) else mixer.width
    heads = (mixer.mixer if isinstance(mixer, registry.SumBidirectional) else mixer).num_heads
    head_dim = width // heads
    x = jax.random.normal(jax.random.key(1), (batch, length, width), dtype)
    rope = rope_1d(head_dim, np.arange(length)) if head_dim % 2 == 0 else None
    graphdef, state = nnx.split(mixer)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, rope=rope)

    def loss(state, x):
        return jnp.mean(jnp.square(forward(state, x).astype(jnp.float32)))

    args = (state, x)
    f = jax.jit(forward).lower(*args).compile()
    fb = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    return {"params": params,
            "fwd_s": median_time(f, args, repeats), "fwd_bwd_s": median_time(fb, args, repeats),
            "fwd_peak_bytes": peak_bytes(f), "fwd_bwd_peak_bytes": peak_bytes(fb)}


def run(mixers, lengths, *, width, heads, batch=1, repeats=3, direction="forward",
        local_window=1024, swa_window=2048, full_impl="chunked", full_max_length=16384,
        dtype=jnp.float32):
    """Yields one row per (mixer, L); rows of a length follow its `local` row if benchmarked."""
    for length in lengths:
        base = None
        for name in mixers:
            row = {"mixer": name, "L": length, "width": width, "heads": heads, "batch": batch,
                   "direction": direction}
            if name == "full" and length > full_max_length:
                yield {**row, "skipped": f"L > --full-max-length {full_max_length}"}
                continue
            mixer = build(name, width, heads, direction=direction, dtype=dtype,
                          local_window=local_window, swa_window=swa_window, full_impl=full_impl)
            m = measure(mixer, batch, length, repeats, dtype)
            if name == "local":
                base = m
            rel = lambda key: m[key] / base[key] if base else float("nan")  # noqa: E731
            yield {**row, "skipped": "", "params": m["params"],
                   "fwd_ms": 1e3 * m["fwd_s"], "fwd_bwd_ms": 1e3 * m["fwd_bwd_s"],
                   "fwd_rel_local": rel("fwd_s"), "fwd_bwd_rel_local": rel("fwd_bwd_s"),
                   "fwd_peak_MiB": m["fwd_peak_bytes"] / 2**20,
                   "fwd_bwd_peak_MiB": m["fwd_bwd_peak_bytes"] / 2**20}


def plot(rows, path, title):
    """Figure 6 analog: time relative to local attention vs L, forward and forward+backward,
    plus compiled forward+backward memory."""
    matplotlib = require("matplotlib", "plots", "the mixer benchmark plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r["skipped"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("fwd_rel_local", "forward time / local attention"),
              ("fwd_bwd_rel_local", "forward+backward time / local attention"),
              ("fwd_bwd_peak_MiB", "forward+backward peak memory (MiB)"))
    for ax, (key, label) in zip(axes, panels):
        for name in dict.fromkeys(r["mixer"] for r in done):
            pts = [(r["L"], r[key]) for r in done if r["mixer"] == name and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    storage.path(path).write_bytes(image.getvalue())   # a local file or gs://...


def _ints(text, flag, parser):
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def main(argv=None):
    parser = ArgumentParser(prog="python -m tttjax.bench mixers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="model width D (5B: 3072)")
    parser.add_argument("--heads", type=int, default=4, help="heads (5B: 48, head dim 64)")
    parser.add_argument("--lengths", default="4096,8192,16384",
                        help="comma-separated L; e.g. 4096,16384,65536")
    parser.add_argument("--mixers", default=",".join(ALL_MIXERS),
                        help=f"comma-separated subset of {','.join(ALL_MIXERS)}")
    parser.add_argument("--local-window", type=int, default=1024,
                        help="tokens per local-attention window (the baseline)")
    parser.add_argument("--swa-window", type=int, default=2048, help="sliding-window keys")
    parser.add_argument("--direction", default="forward", choices=registry.DIRECTIONS)
    parser.add_argument("--full-impl", default="chunked", choices=("xla", "cudnn", "chunked"),
                        help="full attention implementation (chunked: O(L) memory)")
    parser.add_argument("--full-max-length", type=int, default=16384,
                        help="skip full attention above this L")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--plot", default=None, help="write the Figure 6 analog to this PNG")
    args = parser.parse_args(argv)
    lengths = _ints(args.lengths, "--lengths", parser)
    mixers = [m for m in args.mixers.split(",") if m]
    unknown = [m for m in mixers if m not in ALL_MIXERS]
    if unknown or not mixers:
        parser.error(f"unknown mixer(s) {unknown}; choose from {','.join(ALL_MIXERS)}")
    if "local" in mixers:  # the baseline first, so every row of a length has its ratio
        mixers = ["local"] + [m for m in mixers if m != "local"]
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    if min(args.batch, args.repeats, args.local_window, args.swa_window) < 1:
        parser.error("--batch, --repeats, --local-window and --swa-window must be >= 1")

    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}), D={args.width}, "
          f"H={args.heads}, B={args.batch}, {args.dtype}, direction={args.direction}, "
          f"local window {args.local_window}, swa window {args.swa_window}")
    table = MarkdownTable(("mixer", "L", "fwd_ms", "fwd_bwd_ms", "fwd_rel_local",
                           "fwd_bwd_rel_local", "fwd_peak_MiB", "fwd_bwd_peak_MiB"))
    rows = []
    for row in run(mixers, lengths, width=args.width, heads=args.heads, batch=args.batch,
                   repeats=args.repeats, direction=args.direction, local_window=args.local_window,
                   swa_window=args.swa_window, full_impl=args.full_impl,
                   full_max_length=args.full_max_length, dtype=jnp.dtype(args.dtype)):
        rows.append(row)
        # A skipped row has only its labels; its measurement columns read "skipped".
        table.row({**{c: "skipped" for c in table.columns}, "mixer": row["mixer"], "L": row["L"]}
                  if row["skipped"] else row)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot, f"mixers at D={args.width}, H={args.heads} on {device.device_kind}; "
                              f"local attention window {args.local_window}")
        print(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
