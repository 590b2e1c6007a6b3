"""Import diffusers `AutoencoderKLCogVideoX` folders into `tttjax.models.vae.CogVideoXVAE`.

A folder holds `config.json` and safetensors weights (one file, or shards listed by an
`*.safetensors.index.json`). A pipeline folder with a `vae/` sub-folder also works, and
a `gs://` folder (read through a temporary local copy).
Tensors are read one at a time (`safe_open`), so peak host memory is about one tensor
beyond the model itself.

Key mapping: our parameter paths mirror diffusers' state-dict keys; `kernel` is torch's
`weight` moved to channels-last (`[O, I, t, h, w] -> [t, h, w, I, O]`, Conv2d
`[O, I, h, w] -> [h, w, I, O]`) and GroupNorm `scale` is torch's `weight`.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.local_copy import local_folder
from tttjax.models.vae import CogVideoXVAE, VAEConfig
from tttjax.safetensors_folder import model_folder, read_tensors, weight_files

_CLASS_NAME = "AutoencoderKLCogVideoX"
_CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels", "latent_channels",
                  "layers_per_block", "act_fn", "norm_eps", "norm_num_groups",
                  "temporal_compression_ratio", "sample_height", "sample_width", "scaling_factor",
                  "use_quant_conv", "use_post_quant_conv")


def config_from_diffusers(raw: dict[str, Any]) -> VAEConfig:
    """`VAEConfig` from the dict of a diffusers `config.json` (validated)."""
    name = raw.get("_class_name", _CLASS_NAME)
    if name != _CLASS_NAME:
        raise ValueError(f"config.json describes a {name}, not an {_CLASS_NAME}; point at the "
                         "VAE folder (e.g. <pipeline>/vae)")
    for field, block in (("down_block_types", "CogVideoXDownBlock3D"),
                         ("up_block_types", "CogVideoXUpBlock3D")):
        types = raw.get(field)
        if types is not None:
            if any(t != block for t in types):
                raise ValueError(f"config.json: {field} must all be {block!r}, got {types}")
            if len(types) != len(raw.get("block_out_channels", VAEConfig.block_out_channels)):
                raise ValueError(f"config.json: {field} needs one entry per block_out_channels")
    kwargs = {k: raw[k] for k in _CONFIG_FIELDS if k in raw}
    if "temporal_compression_ratio" in kwargs:
        kwargs["temporal_compression_ratio"] = int(kwargs["temporal_compression_ratio"])
    return VAEConfig(**kwargs)


@contextlib.contextmanager
def _named_errors():
    """Prefixes the folder and file errors with `from_diffusers_vae:`, as its own errors."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"from_diffusers_vae: {err}") from None


def _torch_key(path: tuple[Any, ...]) -> str:
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join(str(p) for p in path[:-1] + (leaf,))


def _to_ours(key: str, value: np.ndarray) -> np.ndarray:
    if key.endswith(".weight") and value.ndim == 5:
        return value.transpose(2, 3, 4, 1, 0)
    if key.endswith(".weight") and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def from_diffusers_vae(path: str, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                       precision: Any = None) -> tuple[CogVideoXVAE, VAEConfig]:
    """Builds a `CogVideoXVAE` from a diffusers `AutoencoderKLCogVideoX` folder.

    Args:
      path: folder with config.json + safetensors (or a pipeline folder with `vae/`); a
        `gs://` folder is read through a temporary local copy of it (only `vae/` of a
        pipeline; `tttjax.local_copy`).
      dtype: computation dtype (None: that of the parameters); param_dtype: storage dtype.
      precision: `jax.lax.Precision` for the convolutions (None: backend default).
    Returns:
      (model, config). Raises ValueError listing missing / unexpected keys or shape mismatches.
    """
    with local_folder(path, subfolders=("vae",)) as local:
        return _from_local_vae(local, dtype=dtype, param_dtype=param_dtype, precision=precision)


def _from_local_vae(path: str, *, dtype: Any, param_dtype: Any, precision: Any
                    ) -> tuple[CogVideoXVAE, VAEConfig]:
    with _named_errors():
        folder = model_folder(path, "vae", "AutoencoderKLCogVideoX.save_pretrained")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = config_from_diffusers(json.load(f))
    abstract = nnx.eval_shape(lambda: CogVideoXVAE(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                   param_dtype=param_dtype, precision=precision))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {_torch_key(p): (p, v) for p, v in flat}
    with _named_errors():
        files = weight_files(folder)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        raise ValueError(f"from_diffusers_vae: checkpoint in {folder!r} does not match config.json; "
                         f"missing keys {missing}; unexpected keys {unexpected}")
    values: dict[tuple[Any, ...], jax.Array] = {}
    mismatched = []
    for key, tensor in read_tensors(files, sorted(expected)):
        p, var = expected[key]
        arr = _to_ours(key, np.asarray(tensor))
        if tuple(arr.shape) != tuple(var.shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(var.shape)}")
            continue
        values[p] = jnp.asarray(arr, dtype=var.dtype)
    if mismatched:
        raise ValueError("from_diffusers_vae: shape mismatches (config.json and weights disagree): "
                         + "; ".join(mismatched))
    new_flat = [(p, v.replace(values[p])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat)), config
