"""The training configs the tests run, loaded through the one loader every command uses
(`tttjax.command_line.load_config`), with settings that keep CPU compiles short."""

from tttjax.command_line import load_config

# XLA CPU options that cut compile time several-fold (slower code, same numbers).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False}


def set_fields(cfg, **overrides):
    """Sets `cfg[a][b] = value` for each `"a.b"=value` (keys with dots: pass `**{...}`)."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def tiny_config(arg="none", /, **overrides):
    """`--config tiny:ARG` with fast compiles, no progress bar, then `overrides` (dotted keys)."""
    cfg = load_config(f"tiny:{arg}").unlock()   # tests may add keys (new mixer settings)
    cfg.train.progress_bar = False
    cfg.train.compiler_options = dict(FAST)
    return set_fields(cfg, **overrides)
