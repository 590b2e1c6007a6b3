"""CogVideoX weights from diffusers into `CogVideoXDiT`, and the Orbax checkpoint format.

`from_diffusers(path, **overrides)` reads a diffusers `CogVideoXTransformer3DModel` folder
(`config.json` + `diffusion_pytorch_model.safetensors`, or shards listed by an
`*.safetensors.index.json`; a pipeline folder with `transformer/` also works). Tensors are
read one at a time with `safe_open`; a stacked (per-layer) parameter is assembled in one
host buffer and handed to JAX, so peak host memory is the model plus one stacked tensor,
never two copies of the model. Parameters of a configured mixer (TTT, gates, ...) are not
in diffusers checkpoints: they are freshly initialised as docs/design.md §1-2 prescribes.

Checkpoints (`save_checkpoint` / `load_checkpoint`): a folder with
  model_config.json   `config.model` as JSON (enough to rebuild the module)
  state/              Orbax StandardCheckpointer save of `nnx.state(model)`
Training restores with `load_checkpoint(path, config, mesh=..., rules=...)`, which places
every parameter directly with its sharding (no host copy of the full model).

Key mapping (diffusers -> tttjax; `L` = stacked layer axis, torch Linear weights [out, in]):
  patch_embed.proj.weight [D, C, p, p]      -> patch_proj.kernel [C*p*p, D]
  patch_embed.text_proj                     -> text_proj
  time_embedding.linear_{1,2}               -> time_linear_{1,2}
  transformer_blocks.i.norm{1,2}.linear     -> blocks.modulation{1,2}.linear  [L, E, 6, D]
  transformer_blocks.i.norm{1,2}.norm       -> blocks.norm{1,2}
  transformer_blocks.i.attn1.to_{q,k,v}     -> blocks.attn.to_{q,k,v}         [L, D, H, d]
  transformer_blocks.i.attn1.to_out.0       -> blocks.attn.to_out             [L, H, d, D]
  transformer_blocks.i.attn1.norm_{q,k}     -> blocks.attn.norm_{q,k}
  transformer_blocks.i.ff.net.0.proj / .2   -> blocks.ff.proj_in / proj_out
  norm_final, norm_out.norm, norm_out.linear, proj_out  -> norm_final, norm_out,
                                               norm_out_modulation.linear [E, 2, D], proj_out
LayerNorm `weight` is our `scale`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tttjax import storage
from tttjax.local_copy import local_folder
from tttjax.models import dit_config
from tttjax.models.dit import CogVideoXDiT
from tttjax.safetensors_folder import (ShapeMismatch, TensorReader, model_folder, read_parameter,
                                       weight_files)
from tttjax.sharding import DEFAULT_RULES, LogicalRules, state_shardings

Path = tuple[Any, ...]


# ------------------------------------------------------------------------------ mapping


def _linear(shape_out: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """torch Linear weight [out, in] -> our kernel [in..., out...] reshaped to `shape_out`."""
    return lambda w: w.T.reshape(shape_out)


def _reshape(shape_out):
    return lambda w: w.reshape(shape_out)


def _parameter_sources(cfg) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """{our param path 'a/b/c': (diffusers key, with `{i}` for the layer, transform)}."""
    h, d = cfg.num_attention_heads, cfg.attention_head_dim
    width, emb, p, c = h * d, cfg.time_embed_dim, cfg.patch_size, cfg.in_channels
    out = {
        "patch_proj/kernel": ("patch_embed.proj.weight", lambda w: w.reshape(width, c * p * p).T),
        "patch_proj/bias": ("patch_embed.proj.bias", None),
        "text_proj/kernel": ("patch_embed.text_proj.weight", _linear((cfg.text_embed_dim, width))),
        "text_proj/bias": ("patch_embed.text_proj.bias", None),
        "time_linear_1/kernel": ("time_embedding.linear_1.weight", _linear((width, emb))),
        "time_linear_1/bias": ("time_embedding.linear_1.bias", None),
        "time_linear_2/kernel": ("time_embedding.linear_2.weight", _linear((emb, emb))),
        "time_linear_2/bias": ("time_embedding.linear_2.bias", None),
        "norm_out_modulation/linear/kernel": ("norm_out.linear.weight", _linear((emb, 2, width))),
        "norm_out_modulation/linear/bias": ("norm_out.linear.bias", _reshape((2, width))),
        "proj_out/kernel": ("proj_out.weight", _linear((width, p * p * cfg.out_channels))),
        "proj_out/bias": ("proj_out.bias", None),
    }
    if cfg.norm_elementwise_affine:
        for ours, theirs in (("norm_final", "norm_final"), ("norm_out", "norm_out.norm")):
            out[f"{ours}/scale"] = (f"{theirs}.weight", None)
            out[f"{ours}/bias"] = (f"{theirs}.bias", None)
    blk = "transformer_blocks.{i}."
    for n in ("1", "2"):
        out[f"blocks/modulation{n}/linear/kernel"] = (blk + f"norm{n}.linear.weight",
                                                      _linear((emb, 6, width)))
        out[f"blocks/modulation{n}/linear/bias"] = (blk + f"norm{n}.linear.bias",
                                                    _reshape((6, width)))
        if cfg.norm_elementwise_affine:
            out[f"blocks/norm{n}/scale"] = (blk + f"norm{n}.norm.weight", None)
            out[f"blocks/norm{n}/bias"] = (blk + f"norm{n}.norm.bias", None)
    for proj in ("q", "k", "v"):
        out[f"blocks/attn/to_{proj}/kernel"] = (blk + f"attn1.to_{proj}.weight", _linear((width, h, d)))
        if cfg.attention_bias:
            out[f"blocks/attn/to_{proj}/bias"] = (blk + f"attn1.to_{proj}.bias", _reshape((h, d)))
    out["blocks/attn/to_out/kernel"] = (blk + "attn1.to_out.0.weight", _linear((h, d, width)))
    out["blocks/attn/to_out/bias"] = (blk + "attn1.to_out.0.bias", None)
    if cfg.qk_norm:
        for proj in ("q", "k"):
            out[f"blocks/attn/norm_{proj}/scale"] = (blk + f"attn1.norm_{proj}.weight", None)
            out[f"blocks/attn/norm_{proj}/bias"] = (blk + f"attn1.norm_{proj}.bias", None)
    out["blocks/ff/proj_in/kernel"] = (blk + "ff.net.0.proj.weight", _linear((width, 4 * width)))
    out["blocks/ff/proj_in/bias"] = (blk + "ff.net.0.proj.bias", None)
    out["blocks/ff/proj_out/kernel"] = (blk + "ff.net.2.weight", _linear((4 * width, width)))
    out["blocks/ff/proj_out/bias"] = (blk + "ff.net.2.bias", None)
    return out


def _path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def is_mixer_path(path: Path) -> bool:
    """True for parameters of the mixer slot (absent from diffusers checkpoints)."""
    return len(path) > 1 and path[0] == "blocks" and path[1] == "mixer"


def _fresh_mixer_params(cfg, seed: int) -> dict[str, jax.Array]:
    """Initialises the mixer parameters only (XLA drops the unused base-model initialisers)."""
    def init():
        model = CogVideoXDiT(cfg, rngs=nnx.Rngs(seed))
        flat = nnx.to_flat_state(nnx.state(model))
        return {_path_str(p): v[...] for p, v in flat if is_mixer_path(p)}

    return jax.jit(init)()


# ------------------------------------------------------------------------------ import


def from_diffusers(path: str, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                   rules: LogicalRules = DEFAULT_RULES, **overrides
                   ) -> tuple[CogVideoXDiT, ml_collections.ConfigDict]:
    """Builds a `CogVideoXDiT` from a diffusers `CogVideoXTransformer3DModel` folder.

    Args:
      path: folder with config.json + safetensors (or a pipeline folder with `transformer/`);
        a `gs://` folder is first copied to a temporary local folder (only its
        `transformer/` of a pipeline), read there and deleted (`tttjax.local_copy`).
      seed: RNG seed of the freshly initialised mixer parameters.
      mesh: when given, each parameter is placed with the sharding its logical axis names
        resolve to under `rules` as soon as it is read (no full host copy is kept).
      **overrides: `config.model` fields on top of config.json (mixer="ttt_mlp",
        param_dtype="bfloat16", attention="segment", remat_policy=..., mixer_config=...).
    Returns:
      (model, config.model). Raises ValueError listing missing / unexpected keys or shape
      mismatches between config.json and the weights.
    """
    with local_folder(path, subfolders=("transformer",)) as local:
        return _from_local_diffusers(local, seed=seed, mesh=mesh, rules=rules, **overrides)


def _from_local_diffusers(path: str, *, seed: int, mesh: jax.sharding.Mesh | None,
                          rules: LogicalRules, **overrides
                          ) -> tuple[CogVideoXDiT, ml_collections.ConfigDict]:
    folder = model_folder(path, "transformer", "CogVideoXTransformer3DModel.save_pretrained")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = dit_config.from_diffusers_config(json.load(f), **overrides)
    abstract = nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    sources = _parameter_sources(cfg)
    ours = {_path_str(p) for p, _ in flat if not is_mixer_path(p)}
    if ours != set(sources):
        raise AssertionError(f"internal key map out of date: {sorted(ours ^ set(sources))}")

    expected: dict[str, str] = {}
    for name, (key, _) in sources.items():
        for i in (range(cfg.num_layers) if "{i}" in key else (None,)):
            expected[key.format(i=i) if i is not None else key] = name
    files = weight_files(folder)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint in {folder!r} does not match its config.json: missing keys "
                         f"{missing}; unexpected keys {unexpected}")

    shard_flat = {}
    if mesh is not None:
        shardings = state_shardings(state, mesh, rules)
        shard_flat = {_path_str(p): s for p, s in nnx.to_flat_state(shardings)}
    mixer = _fresh_mixer_params(cfg, seed) if cfg.mixer != "none" else {}
    values, mismatched = {}, []
    with TensorReader(files) as read:
        for p, var in flat:
            name = _path_str(p)
            sharding = shard_flat.get(name)
            if isinstance(sharding, nnx.Variable):
                sharding = sharding.get_value()
            if is_mixer_path(p):
                values[p] = mixer[name] if sharding is None else jax.device_put(mixer[name], sharding)
                continue
            key, transform = sources[name]
            try:
                buf = read_parameter(read, key, var.shape, var.dtype, transform)
            except ShapeMismatch as err:
                mismatched.append(f"{err.key}: checkpoint {err.stored} does not fit model "
                                  f"{err.wanted}")
                continue
            values[p] = jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf)
            del buf
    if mismatched:
        raise ValueError("shape mismatches between config.json and the weights: "
                         + "; ".join(mismatched))
    new_flat = [(p, v.replace(values[p])) for p, v in flat]
    model = nnx.merge(graphdef, nnx.from_flat_state(new_flat))
    return model, cfg


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(model: CogVideoXDiT, path: str) -> str:
    """Writes `model_config.json` and an Orbax `state/` under `path`; returns `path`."""
    import orbax.checkpoint as ocp

    path = storage.resolve(path)       # a local folder or gs://...
    storage.path(path).mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(os.path.join(path, "model_config.json"),
                              model.cfg.to_json(indent=2, sort_keys=True))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "state"), nnx.state(model), force=True)
    checkpointer.wait_until_finished()
    return path


def read_checkpoint_config(path: str) -> ml_collections.ConfigDict:
    """The `config.model` stored next to a checkpoint written by `save_checkpoint`."""
    file = storage.path(os.path.join(storage.resolve(path), "model_config.json"))
    if not file.is_file():
        raise ValueError(f"{path!r} has no model_config.json; give a folder written by "
                         "`python -m tttjax.convert` or `save_checkpoint`")
    return dit_config.validate(ml_collections.ConfigDict(json.loads(file.read_text())))


def load_checkpoint(path: str, config: ml_collections.ConfigDict | None = None, *,
                    mesh: jax.sharding.Mesh | None = None, rules: LogicalRules = DEFAULT_RULES
                    ) -> CogVideoXDiT:
    """Restores a `CogVideoXDiT` written by `save_checkpoint` / `python -m tttjax.convert`.

    Args:
      path: checkpoint folder (holds model_config.json and state/).
      config: `config.model` to build the module with; None uses the stored one. Execution
        fields (dtype, remat_policy, attention_impl, ...) may differ from the stored config;
        parameter shapes must match.
      mesh: when given, every parameter is restored directly into its sharding, resolved from
        its logical axis names with `rules`.
    """
    import orbax.checkpoint as ocp

    path = storage.resolve(path)
    cfg = read_checkpoint_config(path) if config is None else config
    abstract = nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(abstract_state, mesh, rules)
        abstract_state = jax.tree.map(
            lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
            abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), abstract_state)
    return nnx.merge(graphdef, state)

