"""Parameters annotated with logical axis names, placed later by the run's rules.

tttjax names the axes of every parameter (`tttjax.sharding` lists them) and maps them to
mesh axes only when a run places its state (`tttjax.sharding.state_shardings`), as MaxText
does. Flax's eager variable sharding would instead resolve the names at construction time
and demand a mesh there, which breaks building a model on one CPU device, under
`nnx.eval_shape`, or inside a user's model with other rules. Each parameter therefore says
`eager_sharding=False` itself, so no process-wide Flax setting is needed or changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx

AxisNames = Sequence[str | None]


def logical_param(value: jax.Array, names: AxisNames) -> nnx.Param:
    """An `nnx.Param` holding `value` (any shape/dtype) with one logical name per axis."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_init(init: Callable, names: AxisNames) -> Callable:
    """`init` (a Flax initializer) whose parameters carry the logical axis `names`."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)
