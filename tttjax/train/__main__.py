"""Train the video DiT.

    python -m tttjax.train --config configs/tiny.py --workdir /tmp/run [--config.KEY=VALUE ...]
    python -m tttjax.train --config configs/cogvideox_5b.py:9s,ttt_mlp --workdir /shared/run_9s \\
        --config.checkpoint.init_from=/ckpt/stage_3s

Rerunning the same command resumes from WORKDIR/checkpoints (the newest checkpoint that
verifies). Exit codes, one line on stderr for each failure:
  0    done, or preempted by SIGTERM after saving the current step
  1    runtime failure: training diverged (too many non-finite losses in a row), a write
       failed
  2    bad input or usage: invalid config or command line, the workdir is used by another
       run or holds another model, no checkpoint of it can be trusted (nothing compiled)
  130  interrupted by Ctrl-C (after saving the current step when the loop was running)
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
    from tttjax.train.checkpoints import CheckpointWriteError, quiet_orbax_errors
    from tttjax.train.loop import TrainingDiverged, train
    from tttjax.train.workdir_lock import WorkdirLockLost

    quiet_orbax_errors()   # checkpoint failures are reported below, one line each

    try:
        result = train(config, fv.workdir)
    except (ValueError, DistributedConfigError) as err:
        return fail(_PROG, err)
    except (TrainingDiverged, CheckpointWriteError, WorkdirLockLost) as err:
        return fail(_PROG, err, code=1)
    except OSError as err:
        return fail(_PROG, f"{err.filename or fv.workdir}: {err.strerror or err}", code=1)
    except KeyboardInterrupt:
        return fail(_PROG, "interrupted (Ctrl-C) before the current step could be saved; "
                    "committed checkpoints are kept: rerun the same command to resume", code=130)
    if result.interrupted:
        print(f"interrupted (Ctrl-C): {result.step} steps; last checkpoint: step "
              f"{result.last_checkpoint}; rerun the same command to resume", flush=True)
        return 130
    state = "preempted" if result.preempted else "done"
    print(f"{state}: {result.step} steps ({result.updates} updates, {result.nonfinite_total} "
          f"skipped as non-finite); last checkpoint: step {result.last_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
