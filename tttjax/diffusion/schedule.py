"""The discrete DDPM noise schedule of CogVideoX (docs/design.md §4) and v-prediction algebra.

    betas_i       = (linspace(sqrt(0.00085), sqrt(0.012), 1000)_i)^2        ("scaled_linear")
    alphabar_i    = prod_{j<=i} (1 - betas_j)
    alphabar_i   <- alphabar_i / (s + (1 - s) * alphabar_i)                  (SNR shift, s = 1.0)
    sqrt(alphabar) is then shifted and rescaled so that its first value is kept and its last
    is exactly 0 (zero terminal SNR, Lin et al. 2023, Algorithm 1).

A noisy sample at integer timestep t and the v-prediction target are

    x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps
    v   = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0
    x_0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v
    eps = sqrt(1 - alphabar_t) x_t + sqrt(alphabar_t) v

The table is built in float64 NumPy (as diffusers' `CogVideoXDDIMScheduler` does) and used
in float32 by the JAX helpers. At t = 999 alphabar is exactly 0: x_t is pure noise and
x_0 = -v, which is why the model must predict v rather than eps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

_BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule; hashable, so it can be a static argument of jitted functions.

    Defaults are CogVideoX-5B's (docs/design.md §4); `snr_shift_scale=3.0` gives CogVideoX-2B's.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    snr_shift_scale: float = 1.0
    zero_terminal_snr: bool = True

    def __post_init__(self):
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, "
                             f"got {self.beta_schedule!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError("need 0 < beta_start <= beta_end < 1, got "
                             f"{self.beta_start}, {self.beta_end}")
        if self.snr_shift_scale <= 0:
            raise ValueError(f"snr_shift_scale must be > 0, got {self.snr_shift_scale}")

    @functools.cached_property
    def alphas_cumprod_f64(self) -> np.ndarray:
        """float64 [N] alphabar_t for t = 0..N-1 (read-only)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        abar = np.cumprod(1.0 - betas)
        s = self.snr_shift_scale
        abar = abar / (s + (1.0 - s) * abar)
        if self.zero_terminal_snr:
            root = np.sqrt(abar)
            first, last = root[0], root[-1]
            root = (root - last) * (first / (first - last))
            abar = root ** 2
        abar.setflags(write=False)
        return abar

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """float32 [N] alphabar_t (NumPy, so it is a constant under jit, never a tracer)."""
        return self.alphas_cumprod_f64.astype(np.float32)

    @functools.cached_property
    def _sqrt_tables(self) -> tuple[np.ndarray, np.ndarray]:
        abar = self.alphas_cumprod_f64
        return np.sqrt(abar).astype(np.float32), np.sqrt(1.0 - abar).astype(np.float32)

    def coefficients(self, t, ndim: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(sqrt(alphabar_t), sqrt(1 - alphabar_t)) gathered at int `t` [B] (or scalar),
        shaped [B, 1, ..., 1] (rank `ndim`) to broadcast against a batch of samples."""
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"timesteps must be integers in [0, {self.num_train_timesteps}), "
                             f"got dtype {t.dtype}")
        sa, sb = self._sqrt_tables
        a, b = jnp.take(sa, t, mode="clip"), jnp.take(sb, t, mode="clip")
        shape = t.shape + (1,) * (ndim - t.ndim)
        return a.reshape(shape), b.reshape(shape)


DEFAULT_SCHEDULE = NoiseSchedule()


def add_noise(x0, noise, t, schedule: NoiseSchedule = DEFAULT_SCHEDULE):
    """x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise.

    Args:
      x0, noise: [B, ...] clean samples and Gaussian noise (same shape, float).
      t: int [B] (or scalar) timesteps in [0, N).
    Returns:
      [B, ...] noisy samples, dtype of x0.
    """
    a, b = schedule.coefficients(t, x0.ndim)
    return (a * x0 + b * noise).astype(x0.dtype)


def v_target(x0, noise, t, schedule: NoiseSchedule = DEFAULT_SCHEDULE):
    """v = sqrt(alphabar_t) noise - sqrt(1 - alphabar_t) x0; shapes as in `add_noise`."""
    a, b = schedule.coefficients(t, x0.ndim)
    return (a * noise - b * x0).astype(x0.dtype)


def x0_from_v(xt, v, t, schedule: NoiseSchedule = DEFAULT_SCHEDULE):
    """x0 = sqrt(alphabar_t) x_t - sqrt(1 - alphabar_t) v; shapes as in `add_noise`."""
    a, b = schedule.coefficients(t, xt.ndim)
    return (a * xt - b * v).astype(xt.dtype)


def eps_from_v(xt, v, t, schedule: NoiseSchedule = DEFAULT_SCHEDULE):
    """eps = sqrt(1 - alphabar_t) x_t + sqrt(alphabar_t) v; shapes as in `add_noise`."""
    a, b = schedule.coefficients(t, xt.ndim)
    return (b * xt + a * v).astype(xt.dtype)
