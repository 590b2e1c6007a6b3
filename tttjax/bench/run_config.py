"""Command line of the benchmarks that run a training config (`bench train`, `bench sample`).

    --config FILE[:ARG] [--config.KEY=VALUE ...]    as `python -m tttjax.train`
    plus the benchmark's own absl flags (written with - or _: --peak-tflops, --peak_tflops)

Usage errors (unknown file, bad override, invalid config, bad flag value) become
`tttjax.command_line.UsageError` with one line, which the benchmark prints and exits 2 on.
"""

from __future__ import annotations

from collections.abc import Callable

from tttjax.command_line import UsageError, fail, parse_config_flags

__all__ = ["UsageError", "fail", "parse", "positive", "mesh_for", "define_peak_flag", "device_peak"]


def parse(prog: str, doc: str, argv: list[str], define: Callable) -> tuple | None:
    """(validated config, flag values), or None after printing help; see
    `tttjax.command_line.parse_config_flags`."""
    return parse_config_flags(prog, doc, argv, define)


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
    return (make_mesh(sizes, devices=jax.devices()[:num_devices], **config_lib.mesh_layout(config)),
            config_lib.rules(config))


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
