"""TensorBoard events of the training logger: written in the loop's thread, readable back."""

import glob
import os
import struct

import pytest

from tttjax.train.metrics import MetricsLogger


def _scalars(logdir: str) -> dict[str, dict[int, float]]:
    """Every scalar of every event file under `logdir`, parsed from the TFRecord framing."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def _window(loss):
    return [{"loss": loss, "grad_norm": 1.0, "finite": 1, "lr_new": 1e-4}]


def test_scalars_reach_the_event_file_without_a_writer_thread(tmp_path):
    logger = MetricsLogger(str(tmp_path), total_steps=3, start_step=0, tokens_per_step=8,
                           progress_bar=False)
    assert logger._writer._get_file_writer().event_writer._worker.is_alive() is False
    for step in (1, 2, 3):
        logger.log(step, _window(0.5 / step), {"nonfinite_total": 0})
    logger.close()
    scalars = _scalars(str(tmp_path / "tensorboard"))
    assert scalars["train/loss"] == pytest.approx({1: 0.5, 2: 0.25, 3: 0.5 / 3})
    assert set(scalars["train/lr_new"]) == {1, 2, 3}


def test_a_failing_event_write_raises_in_the_loop(tmp_path, monkeypatch):
    """The old writer thread died on a full disk and the loop then blocked forever on its
    full queue; now the OSError reaches the caller."""
    logger = MetricsLogger(str(tmp_path), total_steps=3, start_step=0, tokens_per_step=8,
                           progress_bar=False)
    events = logger._writer._get_file_writer().event_writer

    def full(event):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(events, "add_event", full)
    with pytest.raises(OSError, match="No space left"):
        logger.log(1, _window(0.5), {"nonfinite_total": 0})
