"""Imports of packages only one feature needs (setup.py extras), with the install line.

The core install (`pip install tttjax`) is what the layers and the trainer need; video
writing, plots and the T5 tokenizer each need an extra. Importing one of their packages goes
through `require`, so a missing one is a one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`importlib.import_module(module)`, or `MissingDependency` naming `pip install
    'tttjax[extra]'` when it is not installed (`feature`: what needs it, for the message)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise MissingDependency(f"{feature} needs the {err.name!r} package, not installed: "
                                f"pip install 'tttjax[{extra}]'") from None
