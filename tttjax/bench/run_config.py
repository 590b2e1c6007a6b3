"""Command line of the benchmarks that run a training config (`bench train`, `bench sample`).

    --config FILE[:ARG] [--config.KEY=VALUE ...]    as `python -m tttjax.train`
    plus the benchmark's own absl flags (written with - or _: --peak-tflops, --peak_tflops)

Usage errors (unknown file, bad override, invalid config, bad flag value) become `UsageError`
with one line, which the benchmark prints and exits 2 on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad command line or config: exit code 2."""


def fail(prog: str, message) -> int:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _underscored(arg: str) -> str:
    """`--peak-tflops=5` -> `--peak_tflops=5` (absl names have underscores); config keys kept."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def parse(prog: str, doc: str, argv: list[str], define: Callable) -> tuple:
    """(validated config, flag values), or None after printing help.

    `define(flag_values)` defines the benchmark's own flags. The config is validated as the
    train CLI does (`tttjax.train.config.validate`).
    """
    from absl import flags
    from ml_collections import config_flags

    argv = [prog] + [_underscored(a) for a in argv]
    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.KEY overrides from it (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:ARG])",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    define(fv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        return None
    try:
        fv(argv)
        config = fv.config
        if config is not None:
            "model" in config  # noqa: B015 - a config file loads lazily: fail here, not later
    except (KeyError, AttributeError) as err:  # config_flags: an override of no field
        raise UsageError(f"a --config.KEY override names no field of the config: {err}") from None
    except Exception as err:  # noqa: BLE001 - absl/config_flags raise many types; all are usage errors
        raise UsageError(err) from None
    if config is None:
        raise UsageError("--config is required (e.g. --config configs/tiny.py:ttt_mlp)")
    from tttjax.train import config as config_lib

    config_lib.validate(config)
    return config, fv


def positive(fv, *names: str) -> None:
    """UsageError unless every named int flag is >= 1."""
    for name in names:
        if fv[name].value is None or fv[name].value < 1:
            raise UsageError(f"--{name} must be a positive integer, got {fv[name].value!r}")


def mesh_for(config):
    """(mesh, rules) of a run config on the devices present, as `tttjax.train.loop.train`."""
    import jax

    from tttjax.sharding import make_mesh
    from tttjax.train import config as config_lib

    num_devices = config_lib.mesh_device_count(config, jax.device_count(), jax.process_count())
    sizes = config_lib.validate_mesh(config, num_devices)
    return make_mesh(sizes, devices=jax.devices()[:num_devices]), config_lib.rules(config)


def define_peak_flag(fv) -> None:
    from absl import flags

    flags.DEFINE_float("peak_tflops", None, "peak dense TFLOP/s of one device (default: by "
                       "device kind; none on CPU)", flag_values=fv)


def device_peak(fv) -> tuple[str, float | None]:
    """(device kind, peak TFLOP/s of one device or None) from `--peak-tflops` or the kind."""
    import jax

    from tttjax.bench.mfu import peak_tflops

    if fv.peak_tflops is not None and not fv.peak_tflops > 0:
        raise UsageError(f"--peak-tflops must be positive, got {fv.peak_tflops}")
    kind = jax.devices()[0].device_kind
    return kind, peak_tflops(kind, fv.peak_tflops)
