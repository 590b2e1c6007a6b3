"""`python -m tttjax.bench aot ...` is `python -m tttjax.models.memory_plan ...`: the step
compiled ahead of time on a described mesh of fake CPU devices, printing per-device memory
(options: `python -m tttjax.bench aot --help`)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from tttjax.models import memory_plan

    return memory_plan.main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
