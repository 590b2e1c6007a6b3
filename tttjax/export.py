"""Export trained weights out of tttjax's Orbax format: safetensors + JSON configs.

    python -m tttjax.export --workdir W --out DIR

W is a training workdir (its newest verified checkpoint) or a converted checkpoint folder
(`python -m tttjax.convert`). DIR receives

  config.json                          the diffusers `CogVideoXTransformer3DModel` config
  diffusion_pytorch_model.safetensors  the base model in diffusers' key layout and shapes
                                       (torch Linear weights [out, in]), readable by
                                       `CogVideoXTransformer3DModel.from_pretrained(DIR)`
  tttjax_mixer.safetensors             what diffusers has no place for, one tensor per
                                       block: `transformer_blocks.{i}.mixer.<path>` (the
                                       gates `alpha_fwd` / `alpha_bwd` [modalities, D] and
                                       the mixer's own parameters, e.g. `mixer.W1`); absent
                                       for a plain DiT
  tttjax_config.json                   tttjax's whole `config.model` (mixer, mixer_config,
                                       attention, ...), which config.json cannot hold
  tttjax_generation.json               what the checkpoint samples with (latent size, prompt
                                       length, noise schedule, text encoder and decoder:
                                       `tttjax.generation.pairing`), so that
                                       `TTTVideoPipeline.from_pretrained(DIR)` gives the same
                                       videos as the workdir

`read_export(DIR)` rebuilds the `CogVideoXDiT` through `tttjax.models.dit_weights.from_diffusers`
(the project's diffusers import) with the mixer tensors in place of fresh ones; the round
trip is bitwise, bfloat16 parameters included (stored as safetensors BF16). W and DIR may be
`gs://` URLs (`tttjax.storage`; a URL export is read through a temporary local copy).
Exit codes: 0, 2 for bad input (one line), 1 for a failure while writing.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from tttjax.command_line import ArgumentParser, UsageError, fail

_PROG = "python -m tttjax.export"
BASE_FILE = "diffusion_pytorch_model.safetensors"
MIXER_FILE = "tttjax_mixer.safetensors"
TTTJAX_CONFIG = "tttjax_config.json"
PAIRING_FILE = "tttjax_generation.json"
_MIXER_PREFIX = "transformer_blocks.{i}.mixer."


def _diffusers_shape(key: str, ours: tuple[int, ...], bias_sizes: dict[str, int], cfg
                     ) -> tuple[int, ...]:
    """The shape diffusers stores `key` with, given our per-layer shape of the same tensor."""
    n = int(np.prod(ours))
    if key == "patch_embed.proj.weight":               # Conv2d [D, C, p, p]
        p = cfg.patch_size
        return (n // (cfg.in_channels * p * p), cfg.in_channels, p, p)
    if key.endswith(".bias") or len(ours) == 1:          # biases, LayerNorm weights
        return (n,)
    # torch Linear [out, in]: `out` is its bias's size (the square q/k/v of attention_bias=False
    # models have no bias: width x width).
    out = bias_sizes.get(key[: -len("weight")] + "bias", cfg.num_attention_heads
                         * cfg.attention_head_dim)
    return (out, n // out)


def _inverse(transform, stored_shape: tuple[int, ...], value: np.ndarray) -> np.ndarray:
    """The stored tensor `transform` maps to `value`: the transforms of
    `tttjax.models.dit_weights` only reorder elements (transpose, reshape), so applying one to
    the element indices gives the permutation to undo."""
    if transform is None:
        return value.reshape(stored_shape)
    index = np.arange(value.size).reshape(stored_shape)
    where = np.asarray(transform(index)).reshape(-1)
    out = np.empty(value.size, value.dtype)
    out[where] = value.reshape(-1)
    return out.reshape(stored_shape)


def _load(path: str, seed: int):
    """(flat {'a/b/c': np.ndarray} parameters, config.model) of a workdir or converted folder."""
    import jax
    import ml_collections
    from flax import nnx

    from tttjax import storage
    from tttjax.models import dit_config
    from tttjax.models.dit_weights import read_checkpoint_config
    from tttjax.sharding import DEFAULT_RULES, make_mesh
    from tttjax.train.model_state import checkpoint_kind, load_params, model_spec

    try:
        kind, _ = checkpoint_kind(path)
    except ValueError:
        raise UsageError(f"--workdir {path!r} is neither a training workdir (config.json + "
                         "checkpoints/) nor a converted checkpoint (model_config.json + state/)"
                         ) from None
    if kind == "converted":
        cfg = read_checkpoint_config(path)
    else:
        text = storage.path(os.path.join(path, "config.json")).read_text()
        cfg = dit_config.validate(ml_collections.ConfigDict(json.loads(text)).model)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    spec = model_spec(cfg, mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        params, _ = load_params(spec, path, seed, allow_fresh_mixer=False)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(jax.device_get(v))
            for p, v in flat}, cfg


def export(path: str, out: str, *, seed: int = 0) -> list[str]:
    """Writes the files of the module docstring for the checkpoint at `path` into `out`.

    Returns the written file paths. Raises UsageError for a folder that is not a checkpoint.
    """
    from tttjax import storage
    from tttjax.generation import pairing
    from tttjax.models import dit_config
    from tttjax.models.dit_weights import _parameter_sources

    params, cfg = _load(path, seed)
    settings = pairing(path)
    sources = _parameter_sources(cfg)
    layers = range(cfg.num_layers)
    bias_sizes = {}
    for name, (key, _) in sources.items():
        if key.endswith(".bias"):
            per_layer = params[name].shape[1:] if "{i}" in key else params[name].shape
            for i in (layers if "{i}" in key else (None,)):
                bias_sizes[key.format(i=i) if i is not None else key] = int(np.prod(per_layer))
    base, mixer = {}, {}
    for name, (key, transform) in sources.items():
        value = params.pop(name)
        for i in (layers if "{i}" in key else (None,)):
            mine = value[i] if i is not None else value
            stored = key.format(i=i) if i is not None else key
            shape = _diffusers_shape(stored, mine.shape, bias_sizes, cfg)
            base[stored] = np.ascontiguousarray(_inverse(transform, shape, mine))
    for name, value in params.items():         # what is left: the mixer slot, stacked [L, ...]
        if not name.startswith("blocks/mixer/"):
            raise AssertionError(f"export: no diffusers key for {name!r}")
        rest = name[len("blocks/mixer/"):].replace("/", ".")
        for i in layers:
            mixer[_MIXER_PREFIX.format(i=i) + rest] = np.ascontiguousarray(value[i])

    out = storage.resolve(out)
    storage.path(out).mkdir(parents=True, exist_ok=True)
    written = []

    def write(name, data):
        target = storage.path(out) / name
        write_file(target, data)
        written.append(os.fspath(target))

    config = {"_class_name": "CogVideoXTransformer3DModel", **dit_config.to_diffusers_config(cfg)}
    write("config.json", json.dumps(config, indent=2, sort_keys=True))
    write(PAIRING_FILE, json.dumps(settings, indent=2, sort_keys=True))
    write(BASE_FILE, base)
    stale = storage.path(out) / MIXER_FILE
    if mixer:
        write(MIXER_FILE, mixer)
    elif stale.exists():
        stale.unlink()
    # last: `is_exported` (tttjax.generation) looks for it, so a half-written folder is not one
    write(TTTJAX_CONFIG, cfg.to_json(indent=2, sort_keys=True))
    return written


def write_file(target, data: str | dict[str, np.ndarray]) -> None:
    """Writes text, or a {key: array} dict as safetensors (bfloat16 as BF16), to the local
    path or URL `target` so that no reader sees a partial file: locally a temporary file
    renamed into place, on an object store one upload."""
    from safetensors.numpy import save, save_file

    from tttjax import storage

    target = os.fspath(target)
    if storage.is_url(target):
        if isinstance(data, dict):
            storage.path(target).write_bytes(save(data, metadata={"format": "pt"}))
        else:
            storage.path(target).write_text(data)
        return
    tmp = target + ".partial"
    if isinstance(data, dict):
        save_file(data, tmp, metadata={"format": "pt"})
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
    os.replace(tmp, target)


def read_export(folder: str, *, mesh=None, rules=None) -> tuple[Any, Any]:
    """(CogVideoXDiT, config.model) from a folder written by `export` (local or a URL, read
    through a temporary local copy): the base through `from_diffusers`, the mixer tensors
    from `tttjax_mixer.safetensors`. `mesh` / `rules` place each parameter as it is read."""
    from tttjax.local_copy import local_folder

    with local_folder(folder) as local:
        return _read_local_export(local, mesh=mesh, rules=rules)


def _read_local_export(folder: str, *, mesh, rules) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx
    from safetensors import safe_open

    from tttjax.models import dit_config
    from tttjax.models.dit_weights import from_diffusers, is_mixer_path
    from tttjax.safetensors_folder import read_tensors

    if not os.path.isfile(os.path.join(folder, TTTJAX_CONFIG)):
        raise ValueError(f"{folder}: no {TTTJAX_CONFIG}; give a folder written by "
                         f"`{_PROG} --workdir W --out DIR`")
    with open(os.path.join(folder, TTTJAX_CONFIG), encoding="utf-8") as f:
        full = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        base = json.load(f)
    # tttjax_config.json is the whole config.model; config.json must describe its base.
    differ = sorted(k for k, v in dit_config.to_diffusers_config(full).items()
                    if k in base and base[k] != v)
    if differ:
        raise ValueError(f"{folder}: config.json and {TTTJAX_CONFIG} disagree on {differ}")
    placement = {} if rules is None else {"rules": rules}
    model, cfg = from_diffusers(folder, mesh=mesh, **placement, **full.to_dict())
    mixer_file = os.path.join(folder, MIXER_FILE)
    if cfg.mixer == "none":
        return model, cfg
    if not os.path.isfile(mixer_file):
        raise ValueError(f"{folder}: the model has a {cfg.mixer!r} mixer but no {MIXER_FILE}")
    with safe_open(mixer_file, framework="numpy") as f:
        keys = list(f.keys())
    # read_tensors: bfloat16 tensors come back as ml_dtypes.bfloat16 (NumPy's reader has none)
    stored = dict(read_tensors({k: mixer_file for k in keys}, keys))
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if is_mixer_path(path):
            rest = ".".join(str(p) for p in path[2:])
            keys = [_MIXER_PREFIX.format(i=i) + rest for i in range(cfg.num_layers)]
            missing = [k for k in keys if k not in stored]
            if missing:
                raise ValueError(f"{mixer_file} lacks {missing[0]} (and {len(missing) - 1} more)")
            value = np.stack([stored.pop(k) for k in keys])
            if value.shape != var.shape or value.dtype != var.dtype:
                raise ValueError(f"{mixer_file}: {rest} is {value.dtype}{list(value.shape)}, the "
                                 f"model wants {var.dtype}{list(var.shape)}")
            sharding = getattr(var.get_value(), "sharding", None)
            var = var.replace(jax.device_put(value, sharding) if mesh is not None
                              else jnp.asarray(value))
        flat.append((path, var))
    if stored:
        raise ValueError(f"{mixer_file} holds tensors the model has no place for: "
                         f"{sorted(stored)[:3]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True,
                        help="training workdir or converted checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from tttjax import storage

    try:
        if not storage.path(args.workdir).is_dir():
            raise UsageError(f"--workdir {args.workdir!r} is not a folder")
        if storage.path(args.out).exists() and not storage.path(args.out).is_dir():
            raise UsageError(f"--out {args.out!r} exists and is not a folder")
        written = export(args.workdir, args.out)
    except (UsageError, ValueError) as err:
        return fail(_PROG, err)
    except OSError as err:
        return fail(_PROG, f"writing {args.out!r} failed: {err}", code=1)
    print(f"wrote {', '.join(written)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
