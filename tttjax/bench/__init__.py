"""Benchmarks, run as `python -m tttjax.bench <name> [options]`.

    ops      TTT-MLP / TTT-Linear ops: time, tokens/s and memory vs L      (tttjax.bench.ops)
    mixers   every sequence mixer at one DiT layer's shape, cost relative
             to local attention (the paper's Figure 6 analog)           (tttjax.bench.mixers)
    kernels  Pallas TTT kernels vs the XLA ops at the 5B layer shape: fwd and
             fwd+bwd time, fraction of the bf16 matmul rate            (tttjax.bench.kernels)
    train    the real training step of a config: step time, tokens/s, model
             FLOPs (analytic and XLA's), MFU                            (tttjax.bench.train)
    sample   one denoising step of the DiT at n segments (CFG batch as
             generation runs it): time, tokens/s, FLOPs, MFU           (tttjax.bench.sample)
    aot      the trainer's step compiled ahead of time for a TPU slice (libtpu, any
             host) or fake CPU devices: per-chip memory, cost, roofline    (tttjax.bench.aot)
    study    every mixer trained on the same toon stories, held-out storyboards filmed and
             scored by `tttjax.eval`: the paper's mixer comparison at toy scale (.study)
    step_parts  what a TTT step's kinds of operation cost here (per-head dot, row sum,
             LayerNorm-like fusion), chained in a scan              (tttjax.bench.step_parts)

Shared pieces: `timing` (median wall time, compiled peak memory), `table` (Markdown rows and
CSV), `flops` (analytic DiT FLOPs), `mfu` (peak rates by device), `run_config` (config-file
command line of train/sample).
"""

SUBCOMMANDS = {
    "ops": "TTT ops: time, tokens/s and compiled memory vs sequence length",
    "mixers": "every mixer at one DiT layer's shape, relative to local attention, CSV + PNG",
    "kernels": "Pallas TTT kernels vs XLA ops: fwd, fwd+bwd, fraction of bf16 matmul rate",
    "train": "the real train step of a config: step time, tokens/s, model FLOPs, MFU",
    "sample": "one denoising step at n segments: time, tokens/s, model FLOPs, MFU",
    "aot": "the train step compiled for a TPU slice or fake CPU devices: memory, cost, fits",
    "study": "mixers trained on toon stories, held-out storyboards scored: table, CSV, PNG",
    "step_parts": "a TTT step's kinds of operation, each chained in a scan: us per op, GFLOP/s",
}
