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


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    from tttjax.command_line import UsageError, fail, parse_config_flags

    argv = list(sys.argv if argv is None else argv)

    def define(fv):
        flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard",
                            flag_values=fv)

    try:
        parsed = parse_config_flags(_PROG, __doc__, argv[1:], define)
        if parsed is None:
            return 0
        config, fv = parsed
        if not fv.workdir:
            raise UsageError("--workdir is required")
    except UsageError as err:
        return fail(_PROG, err)

    from tttjax.distributed import DistributedConfigError
    from tttjax.train.loop import TrainingDiverged, train

    try:
        result = train(config, fv.workdir)
    except (ValueError, DistributedConfigError) as err:
        return fail(_PROG, err)
    except TrainingDiverged as err:
        return fail(_PROG, err, code=1)
    state = "preempted" if result.preempted else "done"
    print(f"{state}: {result.step} steps ({result.updates} updates, {result.nonfinite_total} "
          f"skipped as non-finite); last checkpoint: step {result.last_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
