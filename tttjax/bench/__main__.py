"""`python -m tttjax.bench <name> [options]`: runs `tttjax.bench.<name>.main(options)`."""

import argparse
import importlib
import sys

from tttjax.bench import SUBCOMMANDS
from tttjax.command_line import ArgumentParser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        prog="python -m tttjax.bench",
        description="tttjax benchmarks; `python -m tttjax.bench NAME --help` for a benchmark's options.",
        epilog="\n".join(f"  {name:8s} {text}" for name, text in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SUBCOMMANDS), help="benchmark to run")
    if not argv:
        parser.error(f"name a benchmark: {', '.join(sorted(SUBCOMMANDS))}")
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(f"tttjax.bench.{args.name}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
