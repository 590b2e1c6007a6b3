"""What `train` compiles for a (config, mesh), and the batch its step takes.

`_plan(config, mesh, rules)` builds the model spec, optimiser, jitted train step and
initialisers once per (config, mesh, rules) and memoises them (`_PLANS`, the 16 newest), so a
notebook or test that trains again with the same settings does not recompile; fields that do
not change the program (`_NOT_COMPILED`: logging, checkpointing, which examples are read)
are left out of the key. `train_step_setup` adds the global shapes and shardings of the
step's batch, for tools that drive the step themselves (`python -m tttjax.bench train|aot`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import typing
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tttjax.diffusion.schedule import NoiseSchedule
from tttjax.sharding import logical_to_spec
from tttjax.train import config as config_lib
from tttjax.train.model_state import init_params, model_spec
from tttjax.train.optimizer import make_optimizer, optimizer_shardings, trainable_mask
from tttjax.train.step import make_train_step


def _batch_shardings(config, mesh, rules, with_logvar: bool):
    spec = logical_to_spec(("batch",), rules)
    axes = spec[0] if len(spec) else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in mesh.shape)
    sharding = NamedSharding(mesh, PartitionSpec(axes if axes else None))
    keys = ["latents", "text"] + (["latents_logvar"] if with_logvar else [])
    return {k: sharding for k in keys}


def _global_shapes(config, batch: int, with_logvar: bool) -> dict[str, tuple[int, ...]]:
    m, s = config.model, config.stage
    lat = (batch, s.latent_frames, m.in_channels, s.latent_height, s.latent_width)
    shapes = {"latents": lat, "text": (batch, s.num_segments, s.text_length, m.text_embed_dim)}
    if with_logvar:
        shapes["latents_logvar"] = lat
    return shapes


def _check_example_shapes(source, transform, shapes: dict[str, tuple[int, ...]]) -> None:
    """Reads one example so that a dataset made for other shapes (e.g. another VAE or text
    encoder) fails here with a message naming the config fields, not in the first step."""
    if len(source) == 0:
        return
    example = transform.map(source[0])
    for key, shape in shapes.items():
        got = tuple(np.shape(example[key]))
        if got != shape[1:]:
            raise ValueError(
                f"{source!r}: an example's {key} is {got} but the config expects {shape[1:]} "
                "(config.stage.latent_frames / latent_height / latent_width / text_length, "
                "config.model.in_channels / text_embed_dim); set them to the dataset's shapes")


def _tokens_per_step(config, batch: int) -> int:
    m, s = config.model, config.stage
    video = s.latent_frames * (s.latent_height // m.patch_size) * (s.latent_width // m.patch_size)
    return batch * (video + s.num_segments * s.text_length)


@dataclasses.dataclass
class _Plan:
    """Everything compiled for a (config, mesh): reused by later `train` calls in a process."""

    spec: Any
    tx: Any
    opt_shardings: Any
    abstract_opt: Any
    step_fn: Any
    init_params: Any
    init_opt: Any


# Fields that do not change what is compiled (logging, checkpointing, which examples are
# read: batch shapes come from config.stage, which stays in the key).
_NOT_COMPILED = ("log_every", "checkpoint_every", "checkpoint", "mesh.num_devices",
                 "data.data_dir", "data.manual_dir", "data.split", "data.shuffle",
                 "data.worker_count", "data.builder_config", "data.builder_overrides",
                 "data.text_encoder_seed", "data.toy_latent_seed", "train.progress_bar",
                 "train.max_nonfinite_in_a_row", "eval_every", "eval", "profile",
                 "compile_cache_dir", "mesh.num_slices")
_PLANS: collections.OrderedDict = collections.OrderedDict()


def _plan_key(config, mesh, rules) -> str:
    raw = json.loads(config.to_json())
    for field in _NOT_COMPILED:
        *parents, leaf = field.split(".")
        node = raw
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    devices = [d.id for d in mesh.devices.flat]
    return json.dumps([raw, devices, dict(mesh.shape), [list(map(str, r)) for r in rules]],
                      sort_keys=True)


def _plan(config, mesh, rules) -> _Plan:
    """Model spec, optimiser and jitted functions for this config and mesh (memoised, so a
    notebook or test that trains again with the same settings does not recompile)."""
    key = _plan_key(config, mesh, rules)
    batch_sh = _batch_shardings(config, mesh, rules, config.data.dataset == "latents")
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        spec = model_spec(config.model, mesh, rules,
                          indivisible=config.mesh.get("indivisible", "warn"))
    tx, schedules = make_optimizer(config.optim, spec.abstract, trainable=config.train.trainable,
                                   total_steps=config.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, spec.abstract)
    opt_sh = optimizer_shardings(abstract_opt, spec.shardings, replicated)
    abstract_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_opt, opt_sh)
    compiler_options = dict(config.train.compiler_options) or None
    step_fn = make_train_step(
        spec, tx, trainable=trainable_mask(spec.abstract, config.train.trainable),
        schedule=NoiseSchedule(**config.diffusion.to_dict()), schedules=schedules,
        seed=config.seed, prompt_dropout=config.train.prompt_dropout,
        grad_accum_steps=config.train.grad_accum_steps,
        param_shardings=spec.shardings, opt_shardings=opt_sh, batch_shardings=batch_sh, mesh=mesh,
        compiler_options=compiler_options)
    plan = _Plan(spec=spec, tx=tx, opt_shardings=opt_sh, abstract_opt=abstract_opt,
                 step_fn=step_fn,
                 init_params=functools.partial(init_params, spec, config.seed,
                                               compiler_options=compiler_options),
                 init_opt=jax.jit(tx.init, out_shardings=opt_sh, compiler_options=compiler_options))
    _PLANS[key] = plan
    while len(_PLANS) > 16:
        _PLANS.popitem(last=False)
    return plan


class StepSetup(typing.NamedTuple):
    """The step `train` runs for a config and mesh, with the batch it takes."""

    plan: _Plan
    batch_shardings: dict[str, NamedSharding]
    batch_shapes: dict[str, tuple[int, ...]]     # global shapes of the step's batch
    tokens_per_step: int                         # video + text tokens of the global batch
    config: ml_collections.ConfigDict            # with grad_accum_steps resolved for the mesh


def train_step_setup(config: ml_collections.ConfigDict, mesh, rules) -> StepSetup:
    """The memoised plan of `train` for this config and mesh (the same jitted step), and the
    global shapes and shardings of its batch, for tools that drive the step on batches of
    their own (`python -m tttjax.bench train`)."""
    config = config_lib.resolve_accumulation(config, dict(mesh.shape))
    with_logvar = config.data.dataset == "latents"
    batch = config.train.global_batch_size
    return StepSetup(_plan(config, mesh, rules),
                     _batch_shardings(config, mesh, rules, with_logvar),
                     _global_shapes(config, batch, with_logvar), _tokens_per_step(config, batch),
                     config)
