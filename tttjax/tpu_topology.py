"""TPU slices described without TPUs: device descriptions for ahead-of-time compiles.

    devices = tpu_topology.devices("v5p-256")                # 128 v5p chips (256 cores)
    devices = tpu_topology.devices("v5p-8", num_slices=2)    # two 4-chip slices over DCN
    chip = tpu_topology.chip("v5p-256")                      # HBM, peak bf16 rate, bandwidth

With libtpu installed (`pip install "tttjax[tpu]"`), `jax.experimental.topologies` returns the
devices of a described slice on any host, a CPU-only one included; `jax.jit(...).lower(...)
.compile()` on a mesh of them runs the real TPU compiler (XLA:TPU and Mosaic for Pallas
kernels), so memory and cost of a pod program are known before renting the pod, as MaxText's
`train_compile.py` does. Such figures are *compiled, not run*.

Slice names follow Cloud TPU: `v5p-N` and `v4-N` count TensorCores (two per chip), `v5e-N`
(`v5litepod-N`) and `v6e-N` count chips. A topology string (`v5p:4x4x8`, `v6e:16x16`) is taken
as it is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip facts of a TPU generation (Cloud TPU documentation)."""

    generation: str           # "v5p", "v6e", ...
    hbm_bytes: int            # HBM capacity per chip
    peak_bf16_flops: float    # dense bf16 matmul FLOP/s per chip
    hbm_bytes_per_s: float    # HBM bandwidth per chip
    cores_per_chip: int       # TensorCores per chip (what v5p-N / v4-N count)
    dims: int                 # torus dimensions of a slice (3: v4/v5p cubes, 2: v5e/v6e)
    chip_config: str          # libtpu chip config: "megacore" fuses a v4/v5p chip's two cores


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1.228e12, 2, 3, "megacore"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2.765e12, 2, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 0.819e12, 1, 2, "default"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1.640e12, 1, 2, "default"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A parsed slice: generation, chip grid and the number of chips."""

    name: str
    chip: Chip
    shape: tuple[int, ...]    # chips along each torus dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"


def _generation(text: str) -> Chip:
    gen = _ALIASES.get(text, text)
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {text!r}; choose one of {sorted(CHIPS)} "
                         "(e.g. v5p-256, v6e-256, v5p:4x4x8)")
    return CHIPS[gen]


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a Cloud TPU slice of `chips` chips (v5p-256: 4x4x8, v6e-256: 16x16)."""
    if dims == 2:
        if chips & (chips - 1):
            raise ValueError(f"{chips} chips do not form a 2-D slice; use a power of two")
        side = 1
        while side * side < chips:
            side *= 2
        if side * side > chips:
            side //= 2
        return (side, chips // side)
    if chips in (1, 2):
        return (1, chips, 1)
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips do not form a 3-D slice; use 1, 2 or a power of two >= 4")
    # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (Cloud TPU's v4/v5p slice shapes)
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse(name: str) -> Slice:
    """`v5p-256`, `v6e-256`, `v5e-16`, `v4-8` or a topology string `v5p:4x4x8` -> Slice."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    if m:
        chip = _generation(m.group(1))
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"{name!r}: {chip.generation} slices have {chip.dims} torus "
                             f"dimensions, got {len(shape)}")
        return Slice(name, chip, shape)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not m:
        raise ValueError(f"TPU topology {name!r} not understood; give a slice such as v5p-8, "
                         "v5p-256, v6e-256, v5e-256 or a topology such as v5p:4x4x8")
    chip = _generation(m.group(1))
    count = int(m.group(2))
    if count % chip.cores_per_chip:
        raise ValueError(f"{name!r}: {chip.generation}-N counts TensorCores, {chip.cores_per_chip} "
                         "per chip; N must be even")
    return Slice(name, chip, _grid(count // chip.cores_per_chip, chip.dims))


def configure_environment(slice_: Slice) -> None:
    """Environment libtpu reads at start-up, set so that it neither probes the GCE metadata
    server nor warns on a host that is not a TPU VM (values already set are kept)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes /tmp/libtpu_lockfile so two processes never drive the same TPUs; a
    # compile-only process drives none, and should not fail because a training or another
    # compile holds the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                          f"{slice_.chip.generation}-{slice_.chips * slice_.chip.cores_per_chip}")


def devices(name: str, num_slices: int = 1) -> list:
    """TPU device descriptions of `num_slices` slices named `name` (for AOT compiles only).

    Raises ValueError (with the install line) when libtpu is missing.
    """
    slice_ = parse(name)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    configure_environment(slice_)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError("compiling for a TPU topology needs libtpu: pip install 'tttjax[tpu]' "
                         "(or pip install 'jax[tpu]')") from None
    from jax.experimental import topologies

    dims = slice_.chip.dims
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=slice_.topology_name,
        chip_config_name=slice_.chip.chip_config,
        chips_per_host_bounds=(2, 2, 1) if slice_.chips >= 4 else slice_.shape + (1,) * (3 - dims),
        num_slices=num_slices,
        wrap=tuple(d >= 4 and dims == 3 for d in slice_.shape) + (False,) * (3 - dims))
    return list(topo.devices)


def chip(name: str) -> Chip:
    """The per-chip facts of a slice name or topology string."""
    return parse(name).chip
