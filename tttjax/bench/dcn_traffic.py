"""What a compiled multi-slice TPU program sends between slices (over the data-centre network).

    traffic = dcn_traffic.of_compiled(compiled_step.compiled)
    traffic.kinds          # {"ALL_REDUCE": 41}: transfers between slices, by collective
    traffic.only_reductions  # True when slices exchange only summed reductions (gradients)

XLA:TPU compiles one program per slice. Collectives inside a slice stay ordinary HLO
collectives whose `replica_groups` name the slice's own devices (ids below the devices per
slice); every exchange between slices becomes a host-transfer `send`/`recv` pair handled by
the multi-slice ("megascale") runtime, tagged `_xla_megascale_transfer_type` (ALL_REDUCE,
ALL_GATHER, ONE_TO_ONE for a collective-permute, ...) and `_xla_megascale_reduce_operation`.
Reading those tags is how a test checks that only data parallelism crosses slices: a data-
parallel step exchanges gradient (and loss) sums, nothing else.

A small all-gather between slices can be lowered as an all-reduce (each slice contributes its
part, zero-padded), so `send_dtypes` counts the sends by element type: gradient and loss
sums are floating point. A train step also sends one u32 all-reduce: XLA partitions the
counter iota of the noise draw's batch dimension (threefry's `iota_2x32_shape`, B words)
over the batch's devices and gathers it back, a few dozen bytes per step; removing it would
mean drawing the noise row by row (per-example keys), which changes the step's random numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

_SEND = re.compile(r"\bsend\(.*_xla_megascale_transfer_type=\"(\w+)\"")
_REDUCE_OP = re.compile(r"_xla_megascale_reduce_operation=\"(\w+)\"")
_SEND_DTYPE = re.compile(r"= \((\w+)\[")
_COLLECTIVE = re.compile(
    r"= \S+ (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)(?:-start)?\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


@dataclasses.dataclass(frozen=True)
class DcnTraffic:
    """Transfers between slices of one compiled program, and the in-slice collectives."""

    kinds: dict[str, int]           # megascale transfer type -> number of sends
    reduce_ops: dict[str, int]      # reduction of the ALL_REDUCE / REDUCE_SCATTER sends
    ici_collectives: dict[str, int]  # HLO collectives inside a slice, by opcode
    max_group_device: int           # largest device id any in-slice replica group names
    send_dtypes: dict[str, int] = dataclasses.field(default_factory=dict)  # element type -> sends

    @property
    def only_reductions(self) -> bool:
        """True when every transfer between slices is a summed all-reduce or reduce-scatter."""
        return (bool(self.kinds) and set(self.kinds) <= {"ALL_REDUCE", "REDUCE_SCATTER"}
                and set(self.reduce_ops) <= {"SUM"})

    def describe(self) -> str:
        if not self.kinds:
            return "between slices (DCN): nothing"
        parts = ", ".join(f"{n} {k.lower().replace('_', '-')}" for k, n in sorted(self.kinds.items()))
        ops = "/".join(sorted(self.reduce_ops)) or "-"
        if self.send_dtypes:
            ops += "; element types " + ", ".join(f"{t} {n}" for t, n in
                                                  sorted(self.send_dtypes.items()))
        verdict = ("only reductions (data-parallel gradients and loss)" if self.only_reductions
                   else "NOT only reductions: a model axis or a resharding crosses slices")
        return f"between slices (DCN): {parts} transfers (reduction {ops}); {verdict}"


def replica_groups(line: str) -> list[list[int]] | None:
    """The replica groups of one HLO collective line, in either of XLA's two spellings
    (`{{0,1},{2,3}}` or the iota form `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)`); None if absent."""
    m = _GROUPS_IOTA.search(line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    m = _GROUPS_LIST.search(line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return None


def of_text(hlo: str) -> DcnTraffic:
    """DcnTraffic of the text of a compiled (per-slice) TPU program."""
    kinds, reduce_ops, ici = collections.Counter(), collections.Counter(), collections.Counter()
    dtypes = collections.Counter()
    max_id = -1
    for line in hlo.splitlines():
        send = _SEND.search(line)
        if send:
            kinds[send.group(1)] += 1
            dtype = _SEND_DTYPE.search(line)
            if dtype:
                dtypes[dtype.group(1)] += 1
            op = _REDUCE_OP.search(line)
            if op:
                reduce_ops[op.group(1)] += 1
            continue
        coll = _COLLECTIVE.search(line)
        if coll:
            ici[coll.group(1)] += 1
            for group in replica_groups(line) or ():
                max_id = max([max_id, *group])
    return DcnTraffic(dict(kinds), dict(reduce_ops), dict(ici), max_id, dict(dtypes))


def of_compiled(compiled) -> DcnTraffic:
    """DcnTraffic of a `jax.stages.Compiled` (its optimised HLO text)."""
    return of_text(compiled.as_text() or "")
