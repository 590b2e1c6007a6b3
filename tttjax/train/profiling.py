"""A `jax.profiler` trace of a window of training steps, written to WORKDIR/profile.

    config.profile = dict(start_step=3, num_steps=5, all_hosts=False)

traces steps 3..7 (0-based: the 4th to the 8th step; start after the first step, which
compiles) on process 0, or on every host with `all_hosts` (each host writes its own
`profile/plugins/profile/<run>/<host>.xplane.pb`). View it with TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile`, `pip install tensorboard-plugin-profile`) or open
the `.xplane.pb` / `.trace.json.gz` in Perfetto (ui.perfetto.dev). Each step is annotated
(`StepTraceAnnotation`), so the tools show per-step times. `num_steps = 0` turns it off; a
resumed run traces what is left of the window.
"""

from __future__ import annotations

import contextlib

import jax
from etils import epath


class StepProfiler:
    """Starts the trace before step `start_step` and stops it after the window's last step."""

    def __init__(self, profile_config, workdir: str, process_index: int):
        cfg = profile_config
        self.start = int(cfg.start_step) if cfg is not None else 0
        self.stop = self.start + (int(cfg.num_steps) if cfg is not None else 0)
        self.enabled = (cfg is not None and cfg.num_steps > 0
                        and (cfg.all_hosts or process_index == 0))
        self.directory = str(epath.Path(workdir) / "profile")
        self.active = False

    def step(self, step: int):
        """Context for running step `step` (0-based): starts the trace at the window's first
        step and annotates every traced step."""
        if not self.enabled or not self.start <= step < self.stop:
            return contextlib.nullcontext()
        if not self.active:
            epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def step_done(self, done: int, outputs) -> None:
        """After `done` steps: at the window's end, waits for `outputs` (so the trace holds
        the device work of its steps, not only their dispatch) and writes the trace."""
        if self.active and done >= self.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
