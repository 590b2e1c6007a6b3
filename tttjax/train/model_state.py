"""The DiT as plain parameter trees for training: structure, shardings, init and warm starts.

Training keeps the parameters as a nested dict of arrays (`nnx.to_pure_dict` layout, e.g.
`params["blocks"]["attn"]["to_q"]["kernel"]`), which optax, Orbax and jit handle directly
and which does not depend on the mesh. `ModelSpec.apply` rebuilds the NNX module from such a
dict inside the traced step.

Warm starts (`load_params`), by what the path holds:
  - a converted CogVideoX checkpoint (`model_config.json` + `state/`, written by
    `python -m tttjax.convert`): the pretrained weights, and the mixer if it has one;
  - a training workdir (`checkpoints/<step>/params`), e.g. the previous stage's: its
    latest parameters (stage chaining; optimiser state, step and data position start afresh).
Parameters the source lacks may only be the mixer slot's (TTT layer and gates): they are
initialised fresh, as docs/design.md §1-2 prescribes. Anything else missing, or any shape
mismatch, is an error naming the parameters. Every tensor is restored straight into its
sharding on the current mesh.

A training workdir's step is verified before anything is read from it: its files must
match the step's integrity manifest (`tttjax.train.integrity`) and the restored parameters
must be finite; otherwise `CorruptCheckpoint` names the step and the newest intact one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from tttjax import storage
from tttjax.models.dit import CogVideoXDiT
from tttjax.sharding import LogicalRules, state_shardings
from tttjax.train.optimizer import is_new, path_names

Params = dict[str, Any]


@dataclasses.dataclass(eq=False)  # hashed by identity (memoised initialisers)
class ModelSpec:
    """Static description of the model: graph, abstract parameters and their shardings."""

    config: ml_collections.ConfigDict
    graphdef: Any
    template: Any                 # abstract nnx.State of the parameters (for merging)
    abstract: Params              # pure dict of ShapeDtypeStruct with shardings
    shardings: Params             # pure dict of NamedSharding

    def apply(self, params: Params, latents: jax.Array, text: jax.Array, timesteps: jax.Array
              ) -> jax.Array:
        """The DiT's forward pass with `params` (call inside jit)."""
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)(latents, text, timesteps)


def model_spec(model_config: ml_collections.ConfigDict, mesh: Mesh, rules: LogicalRules, *,
               indivisible: str = "warn") -> ModelSpec:
    """The abstract DiT of `model_config` and its parameter shardings on `mesh`;
    `indivisible` as `tttjax.sharding.state_shardings`."""
    abstract_model = nnx.eval_shape(lambda: CogVideoXDiT(model_config, rngs=nnx.Rngs(0)))
    graphdef, template, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the DiT holds non-parameter state; the trainer only carries parameters")
    shardings = nnx.to_pure_dict(state_shardings(template, mesh, rules, indivisible=indivisible))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nnx.to_pure_dict(template), shardings)
    return ModelSpec(model_config, graphdef, template, abstract, shardings)


def _names(tree) -> dict[str, Any]:
    return {"/".join(path_names(p)): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: dict[str, Any]) -> Params:
    out: Params = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def init_params(spec: ModelSpec, seed: int, only: set[str] | None = None,
                compiler_options: dict | None = None) -> Params:
    """Fresh parameters (all, or the names in `only`), created directly in their shardings.

    Only the requested tensors are returned from the jitted initialiser, so XLA drops the
    initialisers of the others.
    """
    options = tuple(sorted((compiler_options or {}).items())) or None
    return _unflatten(_initializer(spec, seed, tuple(sorted(only)) if only else None, options)())


@functools.lru_cache(maxsize=8)
def _initializer(spec: ModelSpec, seed: int, only: tuple[str, ...] | None,
                 options: tuple | None = None):
    flat_sh = _names(spec.shardings)
    keep = sorted(flat_sh) if only is None else list(only)

    def init():
        model = CogVideoXDiT(spec.config, rngs=nnx.Rngs(seed))
        flat = _names(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return {k: flat[k] for k in keep}

    return jax.jit(init, out_shardings={k: flat_sh[k] for k in keep},
                   compiler_options=dict(options) if options else None)


def _latest_params_dir(workdir: str) -> str | None:
    root = storage.path(os.path.join(workdir, "checkpoints"))
    if not root.is_dir():
        return None
    steps = [int(d.name) for d in root.iterdir() if d.name.isdigit() and (d / "params").is_dir()]
    return os.path.join(os.fspath(root), str(max(steps)), "params") if steps else None


def checkpoint_kind(path: str) -> tuple[str, str]:
    """('converted' | 'stage', directory holding the Orbax parameter tree) for a warm start."""
    path = storage.resolve(path)
    if storage.path(os.path.join(path, "model_config.json")).is_file():
        return "converted", os.path.join(path, "state")
    params_dir = _latest_params_dir(path)
    if params_dir is not None:
        return "stage", params_dir
    if os.path.basename(path.rstrip("/")) == "params" and storage.path(path).is_dir():
        return "stage", path
    raise ValueError(f"config.checkpoint.init_from={path!r} is neither a converted checkpoint "
                     "(model_config.json + state/) nor a training workdir with checkpoints/; "
                     "give the folder written by `python -m tttjax.convert` or a previous "
                     "stage's --workdir")


class CorruptCheckpoint(ValueError):
    """A saved step fails verification (bad input: exit code 2 in the commands)."""


def _training_step(directory: str) -> tuple[str, int] | None:
    """(workdir, step) when `directory` is `<workdir>/checkpoints/<step>/params`."""
    step_dir = os.path.dirname(storage.resolve(directory))
    root = os.path.dirname(step_dir)
    name = os.path.basename(step_dir)
    if os.path.basename(root) == "checkpoints" and name.isdigit():
        return os.path.dirname(root), int(name)
    return None


def _corrupt(workdir: str, step: int, reason: str) -> CorruptCheckpoint:
    from tttjax.train.checkpoints import newest_intact_step

    intact = newest_intact_step(workdir, below=step)
    where = os.path.join(workdir, "checkpoints", str(step))
    if intact is None:
        advice = "no older step of this workdir is intact"
    else:
        advice = (f"step {intact} is intact: rerun `python -m tttjax.train` on this workdir "
                  f"to resume from it (step {step} is set aside), or move {where} aside")
    return CorruptCheckpoint(f"checkpoint step {step} ({where}) is corrupt: {reason}; {advice}")


def load_params(spec: ModelSpec, path: str, seed: int, compiler_options: dict | None = None,
                *, allow_fresh_mixer: bool = True) -> tuple[Params, str]:
    """Parameters from a converted checkpoint or a previous stage (see the module doc).

    Returns (params, one-line report of what was loaded and what was initialised fresh).
    `allow_fresh_mixer=False` makes missing mixer parameters an error too (sampling a
    training workdir, whose checkpoints always hold the whole model).
    """
    import orbax.checkpoint as ocp

    from tttjax.train import integrity

    kind, directory = checkpoint_kind(path)
    located = _training_step(directory) if kind == "stage" else None
    if located is not None:
        reason = integrity.verify_step(os.path.dirname(storage.resolve(directory)))
        if reason is not None:
            raise _corrupt(*located, reason)
    def unreadable(err: Exception) -> ValueError:
        what = " ".join(str(err).split())[:200] or type(err).__name__
        if located is not None and not integrity.has_manifest(os.path.dirname(directory)):
            return _corrupt(*located, f"unreadable and without an integrity manifest ({what})")
        return ValueError(f"{directory} cannot be read: {what}")

    try:
        stored_meta = ocp.PyTreeCheckpointer().metadata(directory)
    except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many types
        raise unreadable(err) from None
    stored_tree = getattr(stored_meta, "item_metadata", stored_meta)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    stored = _names(stored_tree)
    suffix = "/value" if kind == "converted" else ""  # nnx.State keeps Variables' `value`
    wanted = _names(spec.abstract)

    found, missing, mismatched = {}, [], []
    for name, target in wanted.items():
        meta = stored.get(name + suffix)
        if meta is None:
            missing.append(name)
        elif tuple(meta.shape) != tuple(target.shape):
            mismatched.append(f"{name}: stored {tuple(meta.shape)}, model {tuple(target.shape)}")
        else:
            found[name + suffix] = target
    not_mixer = [m for m in missing
                 if not allow_fresh_mixer or not is_new(tuple(m.split("/")))]
    if mismatched or not_mixer:
        raise ValueError(
            f"{path} does not fit config.model: "
            + (f"shape mismatches {mismatched}; " if mismatched else "")
            + (f"missing parameters {not_mixer[:8]}{' ...' if len(not_mixer) > 8 else ''}; "
               if not_mixer else "")
            + "check the model config (width, layers, mixer) against the checkpoint")

    target = _unflatten(found)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            directory, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                   partial_restore=True))
    except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many types
        raise unreadable(err) from None
    bad = integrity.nonfinite_leaves(restored)
    if bad:
        reason = (f"non-finite values in {len(bad)} parameter tensors ({bad[0]}"
                  f"{' ...' if len(bad) > 1 else ''})")
        if located is not None:
            raise _corrupt(*located, reason)
        raise CorruptCheckpoint(f"{path} holds {reason}")
    flat = {k[: len(k) - len(suffix)] if suffix else k: v for k, v in _names(restored).items()}
    if missing:
        flat.update(_names(init_params(spec, seed, only=set(missing),
                                       compiler_options=compiler_options)))
    ignored = len(set(stored) - {n + suffix for n in wanted})
    fresh = (f"{len(missing)} mixer tensors initialised fresh"
             + (" (RANDOM: the checkpoint has no mixer weights)" if missing else ""))
    report = (f"initialised from {kind} checkpoint {directory}: {len(found)} tensors loaded, "
              f"{fresh}"
              + (f", {ignored} stored tensors unused" if ignored else ""))
    return _unflatten(flat), report
