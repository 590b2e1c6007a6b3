"""Benchmarks, run as `python -m tttjax.bench <name> [options]`.

    ops      TTT-MLP / TTT-Linear ops: time, tokens/s and memory vs L      (tttjax.bench.ops)
    mixers   every sequence mixer at one DiT layer's shape, cost relative
             to local attention (the paper's Figure 6 analog)           (tttjax.bench.mixers)
"""

SUBCOMMANDS = {
    "ops": "TTT ops: time, tokens/s and compiled memory vs sequence length",
    "mixers": "every mixer at one DiT layer's shape, relative to local attention, CSV + PNG",
}
