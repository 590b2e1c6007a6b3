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

    from tttjax.train import command

    result, code = command.run(_PROG, config, fv.workdir)
    if result is None:
        return code
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
