"""Resuming the data stream: a fresh Grain iterator placed after the examples a run consumed
(when the checkpoint holds no iterator state of its own)."""

from __future__ import annotations

import json


def _position_iterator(iterator, local_consumed: int, shard_index: int, shard_count: int,
                       worker_count: int, local_batch: int) -> None:
    """Puts a fresh Grain iterator after `local_consumed` examples of this host's shard
    (`local_batch` examples per batch)."""
    state = json.loads(iterator.get_state())
    c, w = local_consumed, max(worker_count, 1)
    if c == 0:
        return
    g = w * shard_count
    if worker_count == 0:
        state["last_seen_indices"] = {"0": (c - 1) * shard_count + shard_index}
    else:
        # Worker i reads every w-th record of this host's shard and batches its own records;
        # the loader takes whole batches from the workers in turn.
        batches = c // local_batch
        seen = {}
        for i in range(w):
            produced = max(0, (batches - i + w - 1) // w) * local_batch
            seen[str(i)] = shard_index - g + i * shard_count + produced * g
        state["last_seen_indices"] = seen
        state["last_worker_index"] = (batches - 1) % w
    iterator.set_state(json.dumps(state, indent=4).encode())
