"""Diffusion: the zero-terminal-SNR DDPM schedule (v-prediction), training pieces and samplers.

  schedule   NoiseSchedule, add_noise, v_target, x0_from_v, eps_from_v  (SPEC section 4)
"""

from tttjax.diffusion.schedule import (
    DEFAULT_SCHEDULE,
    NoiseSchedule,
    add_noise,
    eps_from_v,
    v_target,
    x0_from_v,
)

__all__ = ["DEFAULT_SCHEDULE", "NoiseSchedule", "add_noise", "eps_from_v", "v_target", "x0_from_v"]
