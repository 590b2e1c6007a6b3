"""Training checkpoints: Orbax `CheckpointManager` under `WORKDIR/checkpoints`.

Each saved step `WORKDIR/checkpoints/<step>/` holds four items:

    params      the parameter tree (pure dict, OCDBT arrays; mesh-independent)
    opt_state   the optax state (Adam moments per group, accumulated gradients, counts)
    meta        JSON: step, counters, examples consumed, process count, the run's config
    data        the Grain iterator position, one JSON per process (Grain's Orbax handler)

Saving is asynchronous (arrays are copied off the device, then written in the background
while training goes on) and keeps the last `keep` steps. Restoring takes the target
shardings of the *current* mesh, so a run saved on one mesh resumes on another. The data
position is restored from the Grain state when the number of processes is unchanged;
otherwise it is rebuilt from the number of examples consumed (every host reads a
deterministic global order, so position k of the global stream is the same example for any
number of hosts).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass
class _IteratorSnapshot:
    """A data-iterator state frozen at save time (Grain's handler calls `get_state`).

    Saving is asynchronous: the live iterator will have moved on by the time the handler
    runs, so the handler gets the position captured when `save` was called.
    """

    state: bytes

    def get_state(self) -> bytes:
        return self.state


class Checkpointer:
    """Save / restore of (params, opt_state, meta, data iterator) by step."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict, data_state: bytes | None
             ) -> None:
        items = dict(params=ocp.args.StandardSave(params),
                     opt_state=ocp.args.StandardSave(opt_state),
                     meta=ocp.args.JsonSave(dict(meta, process_count=jax.process_count())))
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any, data_iterator=None
                ) -> tuple[Any, Any, dict, bool]:
        """(params, opt_state, meta, data_restored) of `step`, placed as the abstract trees say.

        `data_restored` is False when the iterator could not take the saved Grain state (no
        data item, or a different number of processes); the caller then positions it from
        `meta["examples_consumed"]`.
        """
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state))
        data_dir = os.path.join(self.directory, str(step), "data")
        use_data = (data_iterator is not None and os.path.isdir(data_dir)
                    and meta.get("process_count") == jax.process_count())
        if use_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored["opt_state"], meta, use_data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The `meta` JSON of a saved step (latest by default), without touching arrays."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit())
    if not steps:
        raise ValueError(f"no checkpoints under {root}")
    step = steps[-1] if step is None else step
    for name in ("metadata", "meta.json"):
        path = os.path.join(root, str(step), "meta", name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    raise ValueError(f"checkpoint {root}/{step} has no meta item")
