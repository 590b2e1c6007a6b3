"""Training: config sections and validation, optimiser, sharded step, Orbax checkpoints, loop.

    from tttjax.train import train
    result = train(config, workdir)     # the API behind `python -m tttjax.train`
"""

from tttjax.train.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "train"]
