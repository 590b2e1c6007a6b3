"""What every `python -m tttjax.*` command shares: usage errors and the `--config` flag.

A usage error (bad flag, missing file, invalid config) is printed as one line,
`<prog>: error: <message>`, and the command exits 2 without a traceback and before anything
is compiled or written.

    config, flag_values = parse_config_flags(prog, __doc__, argv, define_my_flags)
    config = load_config("tiny:ttt_mlp", "steps=4")      # the same loader, from Python

`--config` takes a bundled config by name, `NAME[:ARG]` (`tiny:ttt_mlp`,
`cogvideox_5b:63s,ttt_mlp`: the files of the repository's `configs/` folder, installed as the
`tttjax.configs` package), or a config file by path, `PATH.py[:ARG]`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path


class UsageError(ValueError):
    """A command-line or input problem: one line, exit code 2."""


def fail(prog: str, message, code: int = 2) -> int:
    """Prints `message` as one line on stderr and returns `code` (the exit status)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def one_line_errors(prog: str):
    """Decorates a command's `main(argv) -> int`: a `UsageError` becomes one line and exit 2, an
    `OSError` (unreadable input, full disk, no permission) one line and exit 1, never a
    traceback. The command itself cleans up what it had started writing."""
    def decorate(main):
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UsageError as err:
                return fail(prog, err)
            except OSError as err:
                return fail(prog, err, code=1)
        return wrapped
    return decorate


def _underscored(arg: str) -> str:
    """`--peak-tflops=5` -> `--peak_tflops=5` (absl names have underscores); config keys kept."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def bundled_configs_dir() -> Path:
    """The folder of the bundled configs: the installed `tttjax.configs` package (setup.py maps
    it to the repository's `configs/`), or `configs/` beside the `tttjax` package when tttjax
    is imported from a checkout that was not installed (on sys.path by the working directory).
    """
    try:
        spec = importlib.util.find_spec("tttjax.configs")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"


def bundled_config_names() -> list[str]:
    """Names `--config NAME` accepts (sorted): every bundled `configs/<name>.py`."""
    folder = bundled_configs_dir()
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def resolve_config(spec: str) -> str:
    """`NAME[:ARG]` -> `/abs/.../configs/NAME.py[:ARG]`; `PATH.py[:ARG]` is returned as is.

    A spec whose file part ends in `.py` or contains a path separator is a path; anything
    else names a bundled config. Raises `UsageError` for an unknown name or a missing file.
    """
    file, sep, arg = spec.partition(":")
    if file.endswith(".py") or "/" in file or os.sep in file:
        if not os.path.isfile(file):
            raise UsageError(f"--config: no file {file!r} (give a bundled config by name, "
                             f"e.g. tiny:ttt_mlp, or a config file PATH.py[:ARG])")
        return spec
    names = bundled_config_names()
    if file not in names:
        raise UsageError(f"--config: no bundled config {file!r} (bundled: {', '.join(names)}; "
                         "or give a config file PATH.py[:ARG])")
    return str(bundled_configs_dir() / f"{file}.py") + sep + arg


def _resolve_config_arg(argv: list[str]) -> tuple[list[str], str | None]:
    """(`argv` with the value of `--config NAME[:ARG]` / `--config=NAME[:ARG]` resolved to its
    file by `resolve_config`, that file or None); `--config.KEY=VALUE` overrides are kept."""
    out, path = list(argv), None
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
            path = out[i + 1].partition(":")[0]
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg[len("--config="):])
            path = out[i][len("--config="):].partition(":")[0]
    return out, path


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

    `--config NAME[:ARG]` (a bundled config) or `--config PATH.py[:ARG]` and
    `--config.KEY=VALUE` overrides work as in `python -m tttjax.train`; `define(flag_values)` adds the command's own absl flags, which may also be
    written with dashes (`--peak-tflops`). Raises `UsageError` (one line) for an unknown
    file, an override of no field, a bad flag value or a config `tttjax.train.config.validate`
    rejects.
    """
    from absl import flags
    from ml_collections import config_flags

    help_asked = any(a in ("-h", "--help", "-help") for a in argv)
    argv, path = [_underscored(a) for a in argv], None
    if not help_asked:
        argv, path = _resolve_config_arg(argv)
    argv = [prog] + argv
    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.KEY overrides from it (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, "training config: a bundled one by name, "
                                    f"NAME[:ARG] ({', '.join(bundled_config_names())}), or a "
                                    "config file PATH.py[:ARG]",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    if define is not None:
        define(fv)
    if help_asked:
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        return None
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
        raise UsageError("--config is required (e.g. --config tiny:ttt_mlp)")
    from tttjax.train import config as config_lib

    try:
        config_lib.validate(config)
    except ValueError as err:
        raise UsageError(err) from None
    return config, fv


def load_config(spec: str, *overrides: str):
    """The validated, locked `ml_collections.ConfigDict` that `--config SPEC` with
    `--config.KEY=VALUE` for each of `overrides` (`"steps=4"`) gives a command.

    `spec` is `NAME[:ARG]` (bundled) or `PATH.py[:ARG]`. Raises `UsageError` as the commands do.
    """
    argv = ["--config", spec] + [f"--config.{o}" for o in overrides]
    return parse_config_flags("load_config", "", argv)[0]


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (`<prog>: error: ... (see --help)`)
    with exit code 2, instead of argparse's usage block."""

    def error(self, message):
        sys.exit(fail(self.prog, f"{message} (see --help)"))
