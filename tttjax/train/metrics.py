"""Training metrics: progress bar, console, TensorBoard and `WORKDIR/metrics.jsonl`.

Every `log_every` steps one record is written (process 0 only):

    {"step": 120, "loss": 0.41, "grad_norm": 1.3, "lr_pretrained": 1e-05, "lr_new": 0.0001,
     "steps_per_sec": 3.2, "tokens_per_sec": 2900.0, "nonfinite_total": 0,
     "model_tflops_per_device": 210.5, "mfu": 0.459}

`model_tflops_per_device` is the analytic model FLOPs of a step (`tttjax.bench.flops.
train_step_flops`) times steps/s over the devices; `mfu` divides it by the device kind's
peak (`tttjax.bench.mfu`) and is absent where no peak is listed (CPU). With
`config.eval_every`, held-out records `{"step", "eval_loss", "eval_loss_t<T>", ...}`
(`tttjax.train.evaluation`) share the file, and with `config.eval.video_steps` a sample
of a held-out toon storyboard goes to TensorBoard as the image `eval/video`
(`tttjax.train.eval_video`). Printed lines carry time and process index
(`tttjax.train.log_lines`).

`loss` and `grad_norm` are means over the steps since the previous record (with
`log_every = 1`, exactly each step's values); steps whose loss was not finite are left out
of the means and counted in `nonfinite_total`. The same values go to TensorBoard event files
under `WORKDIR/tensorboard` (tensorboardX) and to the console; the tqdm bar shows loss and
throughput.

A resumed run restarts the streams at the restored step: records of later steps (written
by the run that crashed or was stopped after that checkpoint) are dropped from
`metrics.jsonl` when the logger opens, and TensorBoard is told to purge its events from the
next step on (`purge_step`), so every step has exactly one training record.

The workdir may be a `gs://` URL (`tttjax.storage`): `metrics.jsonl` is then uploaded whole
every 30 s and when the logger closes (objects cannot be appended to), and tensorboardX
uploads its event file through google-cloud-storage on each of its flushes and on close.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from tttjax import storage
from tttjax.train import log_lines


_TB_FLUSH_SECS = 30.0


def _write_events_synchronously(writer) -> None:
    """Makes a tensorboardX `SummaryWriter` write its events in the calling thread.

    tensorboardX queues events for a writer thread; when a write fails (a full disk), that
    thread dies, its bounded queue fills, and the next `add_scalar` (or `close`) blocks the
    training loop forever. Written here instead, a failing write raises an OSError in the
    loop, which reports it in one line and exits 1. Relies on tensorboardX's FileWriter
    internals (`event_writer._worker`, `._ev_writer`), checked on use.
    """
    file_writer = writer._get_file_writer()
    events = getattr(file_writer, "event_writer", None)
    worker, ev_writer = getattr(events, "_worker", None), getattr(events, "_ev_writer", None)
    if worker is None or ev_writer is None or not hasattr(ev_writer, "write_event"):
        raise RuntimeError("this tensorboardX version has no EventFileWriter._worker/_ev_writer;"
                           " pin tensorboardX as in constraints.txt")
    worker.stop()            # writes what was queued (the purge events) and ends the thread
    events.add_event = ev_writer.write_event


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites `path` (through a temporary file) without the records of steps > `step`
    (and without a torn last line)."""
    file = storage.path(path)
    if not file.is_file():
        return
    lines = file.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    storage.write_text_atomic(path, "".join(kept))


class MetricsLogger:
    """Writes metric records; a no-op on processes other than 0 (`enabled=False`)."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, tokens_per_step: int,
                 enabled: bool = True, progress_bar: bool = True,
                 model_flops_per_step: float = math.nan, num_devices: int = 1,
                 peak_tflops: float | None = None):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        # MFU as MaxText logs it: analytic model FLOPs (tttjax.bench.flops, 3 x forward) per
        # second per device, over the device kind's peak; no peak (CPU): TFLOP/s only.
        self.model_flops_per_step = model_flops_per_step
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._writer = self._bar = self._jsonl = None
        if not enabled:
            return
        workdir = storage.resolve(workdir)
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_records_after(path, start_step)
        self._jsonl = storage.TextAppender(path)
        from tensorboardX import SummaryWriter

        from tttjax.train.event_files import use_epath_for_object_stores

        use_epath_for_object_stores()
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step > 0 else None)
        _write_events_synchronously(self._writer)
        self._tb_flushed = time.perf_counter()
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def reset_clock(self, step: int) -> None:
        """Restarts the throughput clock (after compilation, so it does not count)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, window: list[dict], counters: dict) -> dict:
        """Summarises the per-step metric dicts of `window` (host floats) as the record of `step`."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        # No throughput for a window that only held the (compiling) first step.
        steps_per_sec = (step - self._last_step) / elapsed if step > self._last_step else math.nan
        self._last_time, self._last_step = now, step
        finite = [m for m in window if m["finite"] > 0]
        mean = lambda k: float(np.mean([m[k] for m in finite])) if finite else math.nan  # noqa: E731
        record = {"step": int(step), "loss": mean("loss"), "grad_norm": mean("grad_norm")}
        for key in sorted(window[-1]):
            if key.startswith("lr_"):
                record[key] = float(window[-1][key])
        record.update(steps_per_sec=steps_per_sec,
                      tokens_per_sec=steps_per_sec * self.tokens_per_step,
                      nonfinite_total=int(counters["nonfinite_total"]))
        tflops = steps_per_sec * self.model_flops_per_step / self.num_devices / 1e12
        if math.isfinite(self.model_flops_per_step):
            record["model_tflops_per_device"] = tflops
            if self.peak_tflops:
                record["mfu"] = tflops / self.peak_tflops
        if not self.enabled:
            return record
        finite_or_null = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                          for k, v in record.items()}
        self._jsonl.write(json.dumps(finite_or_null) + "\n")   # flushed (locally) at once
        for key, value in record.items():
            if key != "step" and math.isfinite(value):
                self._writer.add_scalar(f"train/{key}", value, step)
        if now - self._tb_flushed > _TB_FLUSH_SECS:
            self._writer.flush()
            self._tb_flushed = now
        text = (f"step {step}: loss {record['loss']:.4f}, grad norm {record['grad_norm']:.3f}, "
                f"{steps_per_sec:.2f} steps/s, {record['tokens_per_sec']:.0f} tokens/s")
        rate = {}
        if "model_tflops_per_device" in record:
            text += f", {tflops:.3g} TFLOP/s/device"
            rate["tflops"] = f"{tflops:.3g}"
        if "mfu" in record:
            text += f", MFU {record['mfu']:.1%}"
            rate["mfu"] = f"{record['mfu']:.1%}"
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{steps_per_sec:.2f}",
                                  tokens_s=f"{record['tokens_per_sec']:.0f}", **rate)
        self._say(text)
        return record

    def log_eval(self, step: int, values: dict[str, float]) -> dict:
        """Writes the held-out evaluation of `step` (tttjax.train.evaluation): a record
        {"step", "eval_loss", "eval_loss_t<T>"...} in metrics.jsonl, `eval/...` in TensorBoard."""
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v)
                                          else None) for k, v in record.items()}) + "\n")
        for key, value in values.items():
            if math.isfinite(value):
                self._writer.add_scalar(f"eval/{key.removeprefix('eval_')}", value, step)
        self._say(f"step {step}: held-out " + ", ".join(
            f"{k.removeprefix('eval_')} {v:.4f}" for k, v in values.items()))
        return record

    def log_eval_video(self, step: int, strip, captions: list[str]) -> None:
        """Writes the held-out sample of `step` (tttjax.train.eval_video) to TensorBoard:
        `eval/video`, a uint8 [H, W, 3] frame strip, and `eval/video_captions`."""
        if not self.enabled:
            return
        self._writer.add_image("eval/video", strip, step, dataformats="HWC")
        self._writer.add_text("eval/video_captions", " | ".join(captions), step)

    def _say(self, text: str) -> None:
        text = log_lines.line(text, source="train")
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        self._say(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
