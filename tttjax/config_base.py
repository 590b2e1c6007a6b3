"""What every training config shares, and the syntax of a config's argument.

`get_config()` returns the sections and defaults common to the bundled configs
(`configs/tiny.py`, `configs/cogvideox_5b.py`): a config file starts from it and sets only
what is its own, so a default changed here changes it everywhere. Fields are documented in
`tttjax.train.config`. It lives in the package, not in `configs/`, so that a config file
imports it the same way from a checkout, an editable install or a wheel (a config given by
path to another folder too).

`parse_arguments(arg, name, fields)` reads a config argument, named or positional:

    cogvideox_5b:stage=63s,mixer=ttt_mlp       named
    cogvideox_5b:63s,ttt_mlp                   positional, in the order of `fields`
    tiny:ttt_mlp,segments=3                    positional first, then named
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

REQUIRED = object()   # a field of `parse_arguments` with no default


def parse_arguments(arg: str | None, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Config argument string -> {field: value}, converted to the default's type (int or str).

    `fields` maps each argument name, in positional order, to its default or `REQUIRED`.
    Raises ValueError naming the argument and the accepted form.
    """
    usage = ",".join(f"{k}=..." for k in fields)
    values: dict[str, Any] = {}
    named = False
    positional = 0
    for part in (p.strip() for p in (arg or "").split(",")):
        if not part:
            continue
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            named = True
            if key not in fields:
                raise ValueError(f"{name}: unknown config argument {key!r}; the arguments are "
                                 f"{usage} (or positional, in that order)")
        else:
            if named:
                raise ValueError(f"{name}: positional value {part!r} after a named one in "
                                 f"{arg!r}; give positional values first")
            if positional >= len(fields):
                raise ValueError(f"{name}: too many values in {arg!r}; the arguments are {usage}")
            key, value = list(fields)[positional], part
            positional += 1
        if key in values:
            raise ValueError(f"{name}: config argument {key!r} given twice in {arg!r}")
        values[key] = value
    for key, default in fields.items():
        if key not in values:
            if default is REQUIRED:
                raise ValueError(f"{name}: config argument {key!r} is required; write "
                                 f"'{name}:{usage}'")
            values[key] = default
        elif isinstance(default, int) and not isinstance(default, bool):
            if not str(values[key]).isdigit():
                raise ValueError(f"{name}: config argument {key}={values[key]!r} must be a "
                                 f"non-negative integer")
            values[key] = int(values[key])
    return values


def get_config() -> ml_collections.ConfigDict:
    """The shared sections; `model` and `stage` are left to each config."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.steps = 200                 # train steps (optimiser updates)
    config.log_every = 10
    config.checkpoint_every = 100
    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=8, grad_accum_steps=1, prompt_dropout=0.1, trainable="all",
        max_nonfinite_in_a_row=20, progress_bar=True, compiler_options={}))
    # AdamW with two parameter groups: `pretrained` (the base DiT) and `new` (mixer, gates).
    config.optim = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip=0.1, mu_dtype="",
        pretrained=dict(lr=1e-5, schedule="constant", warmup_steps=100, final_lr_fraction=0.0),
        new=dict(lr=1e-4, schedule="cosine", warmup_steps=100, final_lr_fraction=0.0)))
    # CogVideoX's noise schedule (docs/design.md §4).
    config.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", snr_shift_scale=1.0, zero_terminal_snr=True))
    config.data = ml_collections.ConfigDict(dict(
        dataset="toon_storyboards", builder_config="tiny", builder_overrides={}, data_dir="",
        manual_dir="", split="train", shuffle=True, worker_count=0, text_encoder_seed=0,
        toy_latent_seed=0,
        # the toon world's latent codec: "linear" (a fixed map) or "learned" (an autoencoder)
        toon_codec="linear",
        # VAE latents x latent_scale feed the model; 0: the VAE's scaling factor recorded in
        # the dataset (0.7 for CogVideoX-5B); 1.0: the seed code's (docs/design.md §8).
        latent_scale=0.0))
    config.mesh = ml_collections.ConfigDict(dict(
        axes=dict(data=-1, fsdp=1, tensor=1), rules=(), num_devices=0, dcn_axes=dict(data=-1),
        num_slices=0,
        # a weight axis that does not divide its mesh axis is replicated: warn | error | ignore
        indivisible="warn"))
    config.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True, init_from=""))
    # Observability (tttjax.train.config): held-out loss every eval_every steps (0: never),
    # a jax.profiler trace of profile.num_steps steps (0: none), the persistent XLA cache.
    config.eval_every = 0
    config.eval = ml_collections.ConfigDict(dict(split="validation", batches=1,
                                                  timesteps=(100, 500, 900), seed=0,
                                                  video_steps=0))
    config.profile = ml_collections.ConfigDict(dict(start_step=3, num_steps=0, all_hosts=False))
    config.compile_cache_dir = ""
    return config
