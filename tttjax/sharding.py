"""Logical axis names, the rules that map them to mesh axes, and mesh construction.

Every parameter and key activation in tttjax is annotated with *logical* axis names
(MaxText style); a rule table from the config maps them to *mesh* axes. Changing the
parallelism of a run is therefore a config change, not a code change.

Parameters and activations have separate names, so a run can shard a weight's width one way
and the activations computed with it another (e.g. FSDP weights with sequence-parallel
activations). Parameter axes:
  embed       model width D
  heads       attention / TTT heads
  kv          per-head feature dim d
  mlp         MLP hidden width
  ttt_hidden  hidden width of the TTT-MLP inner network (4d); never sharded
  layers      stacked layer axis of scanned blocks
  state       recurrent state dims of the baseline mixers
  vocab, conv, norm    small axes that stay replicated
Activation axes (`with_logical_constraint` inside the model; BLD, BHLD, BLHD below name the
common layouts):
  activation_batch    examples of the batch
  activation_length   sequence (token) axis; ("activation_length", "tensor") is sequence
                      parallelism between blocks (the 5B config's rule)
  activation_embed    model width D of [B, L, D] activations
  activation_heads    heads of [B, H, L, d] / [B, L, H, d] activations
  activation_kv       per-head feature dim d of those
  activation_mlp      MLP hidden width of [B, L, 4D] activations
Input arrays:
  batch       the global batch of the arrays the trainer places on the mesh
              (`tttjax/train/step_plan.py`); its default equals activation_batch's

The default rules give each activation the sharding of the parameter axis of the same
width (activation_embed and embed both ask for fsdp; `_prune_spec` drops fsdp from the
width of an activation whose batch already uses it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, Any]]

# Parameters are FSDP-sharded over `fsdp` along their width, heads go to `tensor`;
# activations split their batch over data x fsdp and their heads over `tensor`.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "fsdp"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("ttt_hidden", None),
    ("layers", None),
    ("state", None),
    ("vocab", None),
    ("conv", None),
    ("norm", None),
)

DEFAULT_MESH_AXES = ("data", "fsdp", "tensor")

# The activation layouts most constraints use.
BLD = ("activation_batch", "activation_length", "activation_embed")                   # [B, L, D]
BHLD = ("activation_batch", "activation_heads", "activation_length", "activation_kv")  # [B, H, L, d]
BLHD = ("activation_batch", "activation_length", "activation_heads", "activation_kv")  # [B, L, H, d]

# Logical names that no longer exist, and what replaced them: a rule naming one would
# otherwise be appended and match nothing, leaving the run unsharded where it asked.
RETIRED_NAMES = {"length": "activation_length"}


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills at most one `-1` entry of `axis_sizes` so the product equals `num_devices`.

    Raises ValueError naming the axes when the sizes cannot cover the devices exactly.
    """
    sizes = dict(axis_sizes)
    fill = [name for name, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {fill}; give explicit sizes")
    bad = [name for name, s in sizes.items() if s != -1 and (not isinstance(s, int) or s < 1)]
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive integers or -1, bad axes {bad}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes "
                f"{ {k: v for k, v in sizes.items() if v != -1} }; change their sizes")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh: axis sizes {sizes} use {known} devices but {num_devices} are present; "
            "set one axis to -1 to fill")
    return sizes


def make_mesh(axis_sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None, *,
              dcn_axes: Mapping[str, int] | None = None, num_slices: int = 0) -> Mesh:
    """Builds a `Mesh` from `{axis_name: size}` (one size may be -1 to fill).

    Defaults to all devices on the `data` axis, with `fsdp` and `tensor` of size 1, so code
    written against the three default axes runs unchanged on one device.

    Devices of several TPU slices (distinct `slice_index`) get a hybrid mesh
    (`mesh_utils.create_hybrid_device_mesh`): `dcn_axes` `{axis: slices}` (one may be -1:
    all the slices) says which axes span the slices, over the data-centre network; every
    other axis stays inside a slice. `None` picks the first of DCN_AXES the number of slices
    divides. `num_slices` > 0 asserts how many slices the devices must form (a multi-slice
    job whose devices show one slice has lost its DCN wiring). The sizes in `axis_sizes` are
    global (ICI x DCN).

    Raises ValueError naming the mesh and the fix when the devices cannot be laid out as
    asked: there is no fallback to an unplaced reshape, whose collectives would cross the
    slower links silently.
    """
    devices = list(jax.devices() if devices is None else devices)
    if axis_sizes is None:
        axis_sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    sizes = resolve_mesh_shape(axis_sizes, len(devices))
    shape = tuple(sizes.values())
    slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
    if num_slices and slices != num_slices:
        raise ValueError(
            f"config.mesh.num_slices={num_slices} but the {len(devices)} devices form {slices} "
            "slice(s); on a multi-slice job check that every slice joined (MEGASCALE_* "
            "environment, `--num-slices` of the launcher), or set config.mesh.num_slices=0")
    if slices > 1:
        dcn = resolve_dcn_axes(sizes, dcn_axes, slices)
        ici = [s // dcn[n] for n, s in sizes.items()]
        try:
            dev_array = mesh_utils.create_hybrid_device_mesh(
                ici, [dcn[n] for n in sizes], devices=devices)
        except (ValueError, AssertionError, NotImplementedError) as err:
            raise ValueError(
                f"mesh {dict(sizes)} (inside each slice {dict(zip(sizes, ici))}, across "
                f"{slices} slices {dcn}) does not fit the slices' devices: {err}; change "
                "config.mesh.axes / config.mesh.dcn_axes") from None
        return Mesh(dev_array, tuple(sizes.keys()))
    if dcn_axes:
        asked = {n: s for n, s in dcn_axes.items() if s not in (-1, 1)}
        if asked:
            raise ValueError(f"config.mesh.dcn_axes {dict(dcn_axes)} spans several slices, but "
                             f"the devices form one slice; set those axes to -1 or 1")
    try:
        # Topology-aware placement (ICI torus on TPU, global ids on GPU, device order on CPU).
        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError) as err:
        kind = devices[0].device_kind if devices else "?"
        raise ValueError(
            f"mesh {dict(sizes)} cannot be laid out on the {len(devices)} {kind} devices' "
            f"interconnect: {err}; choose axis sizes that follow the slice's torus (e.g. "
            "powers of two that divide its dimensions)") from None
    return Mesh(dev_array, tuple(sizes.keys()))


# Mesh axes that may span TPU slices, in order of preference: between slices only the data
# centre network (DCN, ~10x slower than ICI) connects chips, so the slices should exchange
# only what data parallelism exchanges (one gradient all-reduce per step), as in MaxText's
# dcn_data_parallelism; FSDP over DCN is the fallback when `data` does not divide.
DCN_AXES = ("data", "fsdp")


def resolve_dcn_axes(sizes: Mapping[str, int], dcn_axes: Mapping[str, int] | None,
                     slices: int) -> dict[str, int]:
    """`{axis: slices it spans}` for every axis of `sizes` (1 for axes inside a slice).

    `dcn_axes` gives the spanning axes (one may be -1: the remaining slices); None picks the
    first of DCN_AXES whose size the number of slices divides. Raises ValueError when the
    product is not `slices` or an axis is not a multiple of the slices it spans.
    """
    if not dcn_axes:
        for axis in DCN_AXES:
            if axis in sizes and sizes[axis] % slices == 0:
                dcn_axes = {axis: slices}
                break
        else:
            raise ValueError(
                f"mesh {dict(sizes)} on {slices} TPU slices: one of the axes {DCN_AXES} must be "
                f"a multiple of the number of slices ({slices}) so that slices exchange only "
                f"gradients; e.g. set config.mesh.axes.data to -1 or to a multiple of {slices}")
    unknown = [n for n in dcn_axes if n not in sizes]
    if unknown:
        raise ValueError(f"config.mesh.dcn_axes names {unknown}, which config.mesh.axes "
                         f"{sorted(sizes)} does not have")
    dcn = {n: 1 for n in sizes}
    dcn.update({n: s for n, s in dcn_axes.items()})
    try:
        dcn = resolve_mesh_shape(dcn, slices)
    except ValueError as err:
        raise ValueError(f"config.mesh.dcn_axes {dict(dcn_axes)} on {slices} slices: "
                         f"{str(err).removeprefix('mesh: ')}") from None
    uneven = {n: (sizes[n], d) for n, d in dcn.items() if sizes[n] % d}
    if uneven:
        raise ValueError(
            f"mesh {dict(sizes)} on {slices} TPU slices: axes {uneven} (size, slices spanned) "
            "must be multiples of the slices they span; e.g. set config.mesh.axes.data to -1 "
            f"or to a multiple of {slices}")
    return dcn


def merge_rules(overrides: LogicalRules, base: LogicalRules = DEFAULT_RULES) -> LogicalRules:
    """`base` with the entries of `overrides` replacing those of the same logical name.

    Names new to `base` are appended. A run states only what it changes, e.g.
    `merge_rules([("activation_length", "tensor")])` for sequence parallelism over `tensor`.
    Raises ValueError for a name of RETIRED_NAMES, naming its replacement.
    """
    for rule in overrides:
        name = rule[0] if isinstance(rule, (list, tuple)) and rule else None
        if name in RETIRED_NAMES:
            raise ValueError(f"logical axis {name!r} is no longer used; the rule "
                             f"({name!r}, ...) is now ({RETIRED_NAMES[name]!r}, ...)")
    overrides = {str(name): (tuple(t) if isinstance(t, (list, tuple)) else t)
                 for name, t in overrides}
    merged = [(name, overrides.pop(name, target)) for name, target in base]
    return tuple(merged + list(overrides.items()))


def logical_to_spec(names: Sequence[str | None] | None,
                    rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` with `rules` (unknown names replicate)."""
    if names is None:
        return PartitionSpec()
    return PartitionSpec(*core_spmd.from_sharding_rules(tuple(names), tuple(rules)))


def entry_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one `PartitionSpec` entry: None -> (), "x" -> ("x",), tuple as is."""
    if not entry:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def axes_entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
    """The `PartitionSpec` entry for a sequence of mesh axes (inverse of `entry_axes`)."""
    axes = tuple(axes)
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _prune_spec(spec: PartitionSpec, mesh: Mesh, shape: Sequence[int], *,
                uneven: bool = False) -> PartitionSpec:
    """Drops mesh axes that are absent from `mesh`, do not divide the dimension, or were
    already used by an earlier dimension (e.g. batch and embed both asking for `fsdp`).

    With `uneven`, an axis that does not divide the dimension is kept as long as the
    dimension is at least as large as the axes' product: XLA pads the last shard. That is
    allowed for sharding constraints inside `jit`, not for arrays placed with `device_put`.
    """
    out, used = [], set()
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = entry_axes(entry)
        kept, size = [], 1
        for a in axes:
            ways = size * mesh.shape.get(a, 1)
            fits = dim >= ways if uneven else dim % ways == 0
            if a in mesh.shape and a not in used and fits:
                kept.append(a)
                used.add(a)
                size *= mesh.shape[a]
        out.append(axes_entry(kept))
    return PartitionSpec(*out)


INDIVISIBLE = ("ignore", "warn", "error")


def indivisible_axes(spec: PartitionSpec, mesh_shape: Mapping[str, int],
                     shape: Sequence[int]) -> list[tuple[int, str]]:
    """(dimension, mesh axis) pairs of `spec` that `_prune_spec` drops because the axis
    (of size > 1, present in the mesh) does not divide the dimension: those dimensions are
    replicated over that axis instead of split."""
    out, used = [], set()
    for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        axes = entry_axes(entry)
        size = 1
        for a in axes:
            if a not in mesh_shape or a in used:
                continue
            if dim % (size * mesh_shape[a]) == 0:
                used.add(a)
                size *= mesh_shape[a]
            elif mesh_shape[a] > 1:
                out.append((i, a))
    return out


def state_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, *,
                    indivisible: str = "warn") -> Any:
    """`NamedSharding` for every leaf of an `nnx.State` from its `out_sharding` metadata.

    A mesh axis that does not divide a parameter's dimension replicates that dimension
    (so tiny models shard on any mesh); `indivisible` says what else happens: "ignore",
    "warn" (one warning listing every such parameter) or "error" (ValueError; the 5B configs
    use it, where a silently replicated weight costs memory on every chip).
    """
    if indivisible not in INDIVISIBLE:
        raise ValueError(f"indivisible={indivisible!r} not in {INDIVISIBLE}")
    with nnx.logical_axis_rules(tuple(rules)):
        specs = nnx.get_partition_spec(state)
    found = []

    def to_sharding(path, leaf, spec):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
        for dim, axis in indivisible_axes(spec, mesh.shape, value.shape):
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            found.append(f"{name} dim {dim} ({value.shape[dim]}) over {axis} "
                         f"({mesh.shape[axis]})")
        return NamedSharding(mesh, _prune_spec(spec, mesh, value.shape))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    out = jax.tree_util.tree_map_with_path(to_sharding, state, specs, is_leaf=is_var)
    if found and indivisible != "ignore":
        message = (f"{len(found)} parameter dimension(s) do not divide their mesh axis and are "
                   f"replicated over it: {'; '.join(found[:8])}"
                   f"{'; ...' if len(found) > 8 else ''}. Change config.mesh.axes or "
                   "config.mesh.rules so that the axis divides them")
        if indivisible == "error":
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return out


def with_logical_constraint(x: jax.Array, names: Sequence[str | None],
                            rules: LogicalRules | None = None) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context.

    Rules come from `rules` or the active `nnx.logical_axis_rules` context (default rules
    otherwise). A mesh axis that does not divide its dimension still splits it, with XLA
    padding the last shard: sequence lengths of video rarely divide (the 5B model has 1350
    tokens per latent frame), and dropping the axis instead would keep the whole sequence on
    every device. Only axes larger than their dimension are dropped.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    rules = rules if rules is not None else (core_spmd.get_logical_axis_rules() or DEFAULT_RULES)
    spec = _prune_spec(logical_to_spec(names, rules), mesh, x.shape, uneven=True)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
