"""Train the video DiT.

    python -m tttjax.train --config configs/tiny.py --workdir /tmp/run [--config.KEY=VALUE ...]
    python -m tttjax.train --config configs/cogvideox_5b.py:9s,ttt_mlp --workdir /shared/run_9s \\
        --config.checkpoint.init_from=/ckpt/stage_3s

Rerunning the same command resumes from WORKDIR/checkpoints. Exit codes: 0 done (or
preempted by SIGTERM after saving), 1 training diverged (too many non-finite losses in a
row), 2 invalid config or command line (one-line message, nothing compiled).
"""

from __future__ import annotations

import sys

_PROG = "python -m tttjax.train"


def _fail(message: str, code: int = 2) -> int:
    print(f"{_PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    # sys_argv: config_flags reads the --config.KEY overrides from it (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:ARG])",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard",
                        flag_values=fv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + fv.get_help())
        return 0
    try:
        fv(argv)
        config = fv.config
    except Exception as err:  # noqa: BLE001 - absl/config_flags raise many types; all are usage errors
        return _fail(err)
    if config is None:
        return _fail("--config is required (e.g. --config configs/tiny.py)")
    if not fv.workdir:
        return _fail("--workdir is required")

    from tttjax.distributed import DistributedConfigError
    from tttjax.train import config as config_lib
    from tttjax.train.loop import TrainingDiverged, train

    try:
        config_lib.validate(config)
    except ValueError as err:
        return _fail(err)
    try:
        result = train(config, fv.workdir)
    except (ValueError, DistributedConfigError) as err:
        return _fail(err)
    except TrainingDiverged as err:
        return _fail(err, code=1)
    state = "preempted" if result.preempted else "done"
    print(f"{state}: {result.step} steps ({result.updates} updates, {result.nonfinite_total} "
          f"skipped as non-finite); last checkpoint: step {result.last_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
