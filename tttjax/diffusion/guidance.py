"""Classifier-free guidance with a scale that changes over the sampling steps (docs/design.md §4).

    v = v_uncond + w_i (v_cond - v_uncond),     i = 0 .. steps-1 (0 = the noisiest step)

The unconditional branch is the negative-prompt embedding. Schedules for w_i:

  constant   w_i = scale
  linear     w_i = start + (scale - start) * i / (steps - 1)          (paper: 1 -> 4)
  cosine     w_i = 1 + scale * (1 - cos(pi * (i / steps)^exp)) / 2   (CogVideoX "dynamic CFG",
             scale 6, exp 5 in the public ttt-video-dit configs: 1 at the first step, rising
             to about 1 + scale at the last)

Note on `cosine`: CogVideoX's SAT sampler and diffusers' `use_dynamic_cfg` evaluate this
formula with the DDPM *timestep* in place of the step index
(`(num_steps - t) / num_steps`, t = 999 .. 19), which makes `i / steps` negative and large,
so the scale they apply oscillates instead of rising. We use the step index, which gives
the rising schedule the docs and the paper describe.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

GUIDANCE_KINDS = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A guidance-scale schedule; hashable (usable as a static jit argument).

    Attributes:
      kind: "constant", "linear" or "cosine" (see the module docstring).
      scale: constant: the scale; linear: the last step's scale; cosine: the amplitude.
      start: linear only: the first step's scale.
      exp: cosine only: the exponent on the step fraction.
    """

    kind: str = "linear"
    scale: float = 4.0
    start: float = 1.0
    exp: float = 5.0

    def __post_init__(self):
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"guidance kind must be one of {GUIDANCE_KINDS}, got {self.kind!r}")
        for name in ("scale", "start", "exp"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"guidance {name} must be finite, got {value}")
        if self.kind == "cosine" and self.exp <= 0:
            raise ValueError(f"cosine guidance needs exp > 0, got {self.exp}")

    @classmethod
    def constant(cls, scale: float) -> "Guidance":
        return cls(kind="constant", scale=float(scale))

    @classmethod
    def linear(cls, start: float = 1.0, end: float = 4.0) -> "Guidance":
        return cls(kind="linear", scale=float(end), start=float(start))

    @classmethod
    def cosine(cls, scale: float = 6.0, exp: float = 5.0) -> "Guidance":
        return cls(kind="cosine", scale=float(scale), exp=float(exp))

    def scales(self, steps: int) -> np.ndarray:
        """float64 [steps] guidance scale of each step, noisiest first."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        i = np.arange(steps, dtype=np.float64)
        if self.kind == "constant":
            return np.full(steps, self.scale, np.float64)
        if self.kind == "linear":
            frac = i / (steps - 1) if steps > 1 else np.ones(1)
            return self.start + (self.scale - self.start) * frac
        return 1.0 + self.scale * (1.0 - np.cos(np.pi * (i / steps) ** self.exp)) / 2.0

    def is_unguided(self) -> bool:
        """True when every step's scale is 1, so the unconditional branch is never needed."""
        return self.kind == "constant" and self.scale == 1.0


def as_guidance(guidance) -> Guidance:
    """A `Guidance` from a `Guidance`, a number (constant scale) or None (no guidance)."""
    if guidance is None:
        return Guidance.constant(1.0)
    if isinstance(guidance, Guidance):
        return guidance
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
        return Guidance.constant(float(guidance))
    raise ValueError(f"guidance must be a Guidance, a number or None, got {type(guidance).__name__}")


def combine(v_uncond, v_cond, scale):
    """v_uncond + scale * (v_cond - v_uncond) (diffusers' order of operations)."""
    return v_uncond + scale * (v_cond - v_uncond)
