"""Diffusion: the zero-terminal-SNR DDPM schedule (v-prediction), training pieces and samplers.

  schedule   NoiseSchedule, add_noise, v_target, x0_from_v, eps_from_v  (docs/design.md §4)
  guidance   Guidance: classifier-free guidance scale schedules (constant, linear, cosine)
  samplers   sample(): DDIM / DPM-Solver++(2M) SDE in one jitted loop
"""

from tttjax.diffusion.guidance import Guidance
from tttjax.diffusion.samplers import sample, sampling_timesteps
from tttjax.diffusion.schedule import (
    DEFAULT_SCHEDULE,
    NoiseSchedule,
    add_noise,
    eps_from_v,
    v_target,
    x0_from_v,
)

__all__ = ["DEFAULT_SCHEDULE", "Guidance", "NoiseSchedule", "add_noise", "eps_from_v", "sample",
           "sampling_timesteps", "v_target", "x0_from_v"]
