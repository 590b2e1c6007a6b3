"""A Grain sampler that gives every host a contiguous block of rows of each global batch.

Grain's `DataLoader` shards by interleaving: with `ShardOptions(shard_index=i,
shard_count=n)` host `i` reads sampler positions `i, i + n, i + 2n, ...`. With a plain
sampler, row `r` of a global batch would then hold a different example for every host
count, and so would get different noise. `BlockShardSampler` wraps a global-order sampler
(`grain.samplers.IndexSampler` without sharding: the same shuffled order on every host) and
renumbers its positions so that the interleaved reads of host `i` are exactly positions

    k * global_batch + i * local_batch + j,   j < local_batch

of global batch `k`: host `i` holds rows `[i * local_batch, (i + 1) * local_batch)`, which is
what `jax.make_array_from_process_local_data` expects for a batch sharded over hosts in
order. Row `r` of global batch `k` is then the example at global position `k * B + r` for any
number of hosts, so a 2-host run sees the same batches, row for row, as a 1-host run.
"""

from __future__ import annotations

import grain


class BlockShardSampler:
    """Renumbers `inner`'s positions so Grain's interleaved shards read contiguous blocks."""

    def __init__(self, inner, *, global_batch: int, shard_count: int):
        if shard_count < 1 or global_batch % shard_count:
            raise ValueError(f"global batch {global_batch} must be divisible by the number of data "
                             f"shards {shard_count}")
        self._inner = inner
        self.global_batch, self.shard_count = global_batch, shard_count
        self.local_batch = global_batch // shard_count

    def position(self, index: int) -> int:
        """Global position read at the DataLoader's (interleaved) sampler index `index`."""
        i, shard = divmod(index, self.shard_count)    # host `shard` reads its i-th example
        k, j = divmod(i, self.local_batch)
        return k * self.global_batch + shard * self.local_batch + j

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"negative sampler index {index}")
        return self._inner[self.position(index)]

    def __repr__(self) -> str:
        return (f"BlockShardSampler({self._inner!r}, global_batch={self.global_batch}, "
                f"shard_count={self.shard_count})")
