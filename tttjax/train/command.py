"""The trainer as the command line runs it: `train` with its failures mapped to exit codes.

`python -m tttjax.train` and `python -m tttjax.demo` both train through `run`, so a bad
workdir or a failed write is the same one line and exit code from either (the codes are
listed in `tttjax/train/__main__.py`).
"""

from __future__ import annotations

from tttjax.command_line import fail


def run(prog: str, config, workdir: str):
    """`tttjax.train.loop.train(config, workdir)`, its failures printed as one line on stderr.

    Returns (TrainResult, 0), or (None, exit code) after a failure: 2 for bad input (a config
    the run cannot use, a workdir of another model or used by another run, a multi-host
    setting that does not add up), 1 for runtime failures (divergence, a failed checkpoint
    write, a lost workdir lock, an OS error), 130 for Ctrl-C.
    """
    from tttjax.distributed import DistributedConfigError
    from tttjax.train.checkpoints import CheckpointWriteError, quiet_orbax_errors
    from tttjax.train.loop import TrainingDiverged, train
    from tttjax.train.workdir_lock import WorkdirLockLost

    quiet_orbax_errors()   # checkpoint failures are reported here, one line each
    try:
        return train(config, workdir), 0
    except (ValueError, DistributedConfigError) as err:
        return None, fail(prog, err)
    except (TrainingDiverged, CheckpointWriteError, WorkdirLockLost) as err:
        return None, fail(prog, err, code=1)
    except OSError as err:
        return None, fail(prog, f"{err.filename or workdir}: {err.strerror or err}", code=1)
    except KeyboardInterrupt:
        return None, fail(prog, "interrupted (Ctrl-C) before the current step could be saved; "
                          "committed checkpoints are kept: rerun the same command to resume",
                          code=130)
