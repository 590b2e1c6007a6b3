"""Model FLOPs utilisation: achieved model FLOP/s over the devices' peak dense bf16 rate.

Peaks are the vendors' dense (no sparsity) bfloat16 matmul rates per chip. CPUs and devices
not listed have no peak here; `--peak-tflops` supplies one.
"""

from __future__ import annotations

import math

# (substring of the lower-cased `device_kind`, TFLOP/s); first match wins, so the more
# specific names come first ("TPU v5 lite" is v5e, plain "TPU v5" is v5p).
PEAK_TFLOPS = (
    ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
    ("v6 lite", 918.0), ("v6e", 918.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("tpu v5", 459.0),
    ("v4", 275.0),
)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device of `device_kind` (`override` wins); None if unknown."""
    if override is not None:
        return float(override)
    kind = device_kind.lower()
    if "cpu" in kind:
        return None
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value
    return None


def device_peak_tflops(devices) -> float | None:
    """Peak dense bf16 TFLOP/s of one of `devices` (jax.Device); None when the kind has no
    listed peak (CPU, an unknown accelerator) or the devices are of several kinds."""
    kinds = {d.device_kind for d in devices}
    return peak_tflops(kinds.pop()) if len(kinds) == 1 else None


def mfu(model_flops: float, seconds: float, devices: int, peak: float | None) -> float:
    """model_flops / seconds / (devices * peak TFLOP/s); NaN when the peak is unknown."""
    if peak is None or not seconds > 0:
        return math.nan
    return model_flops / seconds / (devices * peak * 1e12)
