"""What every `python -m tttjax.*` command shares: usage errors and the `--config` flag.

A usage error (bad flag, missing file, invalid config) is printed as one line,
`<prog>: error: <message>`, and the command exits 2 without a traceback and before anything
is compiled or written.

    config, flag_values = parse_config_flags(prog, __doc__, argv, define_my_flags)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """A command-line or input problem: one line, exit code 2."""


def fail(prog: str, message, code: int = 2) -> int:
    """Prints `message` as one line on stderr and returns `code` (the exit status)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _underscored(arg: str) -> str:
    """`--peak-tflops=5` -> `--peak_tflops=5` (absl names have underscores); config keys kept."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def _config_path(argv: list[str]) -> str | None:
    """The file part of `--config FILE[:ARG]` / `--config=FILE[:ARG]`, if given."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
        if arg.startswith("--config="):
            return arg[len("--config="):].split(":", 1)[0]
    return None


def _without_traceback(message: str) -> str:
    """config_flags embeds the config file's whole traceback in its error; keep its prefix
    (which flag) and the exception line at the end (what the config file said)."""
    if "Traceback (most recent call last)" not in message:
        return message
    head = message.split("Traceback (most recent call last)")[0].strip().rstrip(":")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{head}: {lines[-1]}" if lines else head


def parse_config_flags(prog: str, doc: str, argv: list[str], define: Callable | None = None):
    """(validated config, absl FlagValues) from `argv` (without the program name), or None
    after printing help.

    `--config FILE[:ARG]` and `--config.KEY=VALUE` overrides work as in `python -m
    tttjax.train`; `define(flag_values)` adds the command's own absl flags, which may also be
    written with dashes (`--peak-tflops`). Raises `UsageError` (one line) for an unknown
    file, an override of no field, a bad flag value or a config `tttjax.train.config.validate`
    rejects.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = [prog] + [_underscored(a) for a in argv]
    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.KEY overrides from it (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:ARG])",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    if define is not None:
        define(fv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        return None
    path = _config_path(argv[1:])
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"--config: no file {path!r} (give configs/<name>.py[:ARG], e.g. "
                         "configs/tiny.py:ttt_mlp)")
    try:
        fv(argv)
        config = fv.config
        if config is not None:
            "model" in config  # noqa: B015 - a config file loads lazily: fail here, not later
    except AttributeError as err:
        if "get_config" in str(err):
            raise UsageError(f"--config {path!r} defines no get_config() function (a config "
                             "file is a Python module with def get_config(arg=...))") from None
        raise UsageError(f"a --config.KEY override names no field of the config: {err}") from None
    except KeyError as err:  # config_flags: an override of no field
        raise UsageError(f"a --config.KEY override names no field of the config: {err}") from None
    except Exception as err:  # noqa: BLE001 - absl/config_flags raise many types; all are usage errors
        raise UsageError(_without_traceback(str(err))) from None
    if config is None:
        raise UsageError("--config is required (e.g. --config configs/tiny.py:ttt_mlp)")
    from tttjax.train import config as config_lib

    try:
        config_lib.validate(config)
    except ValueError as err:
        raise UsageError(err) from None
    return config, fv


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (`<prog>: error: ... (see --help)`)
    with exit code 2, instead of argparse's usage block."""

    def error(self, message):
        sys.exit(fail(self.prog, f"{message} (see --help)"))
