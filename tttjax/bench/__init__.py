"""Benchmarks, run as `python -m tttjax.bench <name> [options]`.

    ops      TTT-MLP / TTT-Linear ops: time, tokens/s and memory vs L      (tttjax.bench.ops)
    mixers   every sequence mixer at one DiT layer's shape, cost relative
             to local attention (the paper's Figure 6 analog)           (tttjax.bench.mixers)
    kernels  Pallas TTT kernels vs the XLA ops at the 5B layer shape: fwd and
             fwd+bwd time, fraction of the bf16 matmul rate            (tttjax.bench.kernels)
"""

SUBCOMMANDS = {
    "ops": "TTT ops: time, tokens/s and compiled memory vs sequence length",
    "mixers": "every mixer at one DiT layer's shape, relative to local attention, CSV + PNG",
    "kernels": "Pallas TTT kernels vs XLA ops: fwd, fwd+bwd, fraction of bf16 matmul rate",
}
