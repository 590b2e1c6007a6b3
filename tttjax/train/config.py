"""The training sections of a run config, and their validation (run once, before any compile).

A training config (`configs/tiny.py`, `configs/cogvideox_5b.py`) holds, besides `config.model`
(the DiT) and `config.stage` (the clip geometry):

    seed, steps, log_every, checkpoint_every         top level (steps = optimiser updates)
    train       global_batch_size (examples per optimiser update), grad_accum_steps
                (micro-batches per update, accumulated inside the step; 0 = automatic: one
                example per batch shard in each micro-batch),
                prompt_dropout, trainable ("all" | "mixer_qkvo" | "mixer_qkvo_norms" | "mixer"),
                max_nonfinite_in_a_row, progress_bar, compiler_options (XLA options for
                the step, e.g. {"xla_backend_optimization_level": 0} for fast CPU compiles)
    optim       b1, b2, eps, weight_decay, grad_clip, mu_dtype,
                pretrained / new: lr, schedule ("constant" | "cosine"), warmup_steps,
                final_lr_fraction
    diffusion   the noise schedule (tttjax.diffusion.schedule.NoiseSchedule fields)
    data        dataset ("toon_storyboards" | "latents"), builder_config, builder_overrides,
                data_dir, manual_dir, split, shuffle, worker_count, text_encoder_seed,
                toy_latent_seed, toon_codec ("linear" | "learned": the toon world's latent
                codec, `tttjax.data.toy_latents.make_toon_codec`; absent = "linear")
    mesh        axes {name: size, one may be -1}, rules (logical axis -> mesh axes, overriding
                those of tttjax.sharding.DEFAULT_RULES), num_devices (0 = all devices; N = the first
                N devices of a single process, e.g. to compare meshes in one test process),
                dcn_axes {axis: slices spanned, one may be -1} (multi-slice TPU: the axes
                that cross slices over DCN; sizes in `axes` stay global), num_slices (0 = as
                the devices show; N = fail unless the devices form N slices)
    checkpoint  keep, async_save, init_from ("" | converted checkpoint | previous workdir)
    eval_every  held-out loss every N steps (0 = never; tttjax.train.evaluation)
    eval        split, batches (global batches per evaluation), timesteps (fixed diffusion
                timesteps the loss is taken at), seed (of the fixed noise), video_steps
                (toon world: sampler steps of a held-out sample video for TensorBoard,
                tttjax.train.eval_video; 0 or absent = none)
    profile     start_step, num_steps (0 = no trace), all_hosts (else process 0 only):
                a jax.profiler trace into WORKDIR/profile (tttjax.train.profiling)
    compile_cache_dir  persistent XLA compilation cache ("" = WORKDIR/compile_cache,
                "none" = off; tttjax.compile_cache)
The last four are optional: a config without them runs with them off (eval, profile) or
at their default (compile cache).

`validate(config)` checks all of it, including that the dataset's geometry matches the model
and the stage, and raises one ValueError naming the field and the fix. It also warns
(`LowPrecisionStorageWarning`) when the trained parameters are stored below float32: the
train step applies AdamW updates to the stored parameters, and `config.model.dtype` (the
compute dtype) is what should be bfloat16, not `config.model.param_dtype`.
`validate_mesh(config, num_devices)` checks the mesh against the devices present.
"""

from __future__ import annotations

import copy
import math
import warnings

import ml_collections

from tttjax import storage
from tttjax.models import dit_config

SECTIONS = ("model", "stage", "train", "optim", "diffusion", "data", "mesh", "checkpoint")


class LowPrecisionStorageWarning(UserWarning):
    """A training config stores its parameters in a dtype narrower than float32."""


def _warn_low_precision_storage(config) -> None:
    storage = config.model.param_dtype
    if storage == "float32":
        return
    # The update is added to the stored weight, and a bfloat16 weight only moves in steps of
    # 2^-8..2^-7 of its magnitude while an Adam step is about lr in size: at the 5B rates
    # (1e-5, 1e-4) nearly every update rounds away (tests/test_train_precision.py: tiny
    # DiT, bf16 compute, lr 1e-5, 4 steps: 10% of the weights move, 91% with float32).
    # stacklevel 1: Python's default filter then prints it once per process, however many
    # tools validate the same config.
    warnings.warn(
        f"config.model.param_dtype={storage!r}: parameters (and the AdamW second moment, "
        f"which optax keeps in the parameters' dtype) are stored and updated in {storage}, "
        "where an update below half a rounding step of the weight (0.2-0.4% of its "
        "magnitude in bfloat16) is lost; at learning rates like 1e-5 most weights never "
        "change. Set config.model.param_dtype='float32' (float32 master weights); the "
        "forward and backward passes still compute in config.model.dtype.",
        LowPrecisionStorageWarning)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _int(value, name: str, lo: int = 1) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= lo,
          f"config.{name} must be an int >= {lo}, got {value!r}")


def _rules(config) -> tuple:
    from tttjax.sharding import merge_rules

    return merge_rules(config.mesh.get("rules") or ())


def batch_mesh_axes(config) -> tuple[str, ...]:
    """Mesh axes the `batch` logical axis maps to (those present in config.mesh.axes)."""
    for name, target in _rules(config):
        if name == "batch":
            axes = target if isinstance(target, tuple) else (target,) if target else ()
            return tuple(a for a in axes if a in config.mesh.axes)
    return ()


def micro_batch_size(config) -> int:
    """Examples per micro-batch of a config whose accumulation is resolved (not 0)."""
    accum = config.train.grad_accum_steps
    _need(accum > 0, "train.grad_accum_steps is 0 (automatic) until the mesh is known; call "
          "resolve_accumulation(config, mesh sizes) first")
    return config.train.global_batch_size // accum


def resolve_accumulation(config, sizes: dict[str, int]) -> ml_collections.ConfigDict:
    """`config` with `train.grad_accum_steps` resolved for a mesh of these axis sizes.

    A positive value is kept (the same object is returned). 0 means automatic: as many
    micro-batches as put one example on each batch shard, global_batch / shards; a copy is
    returned. Training a long stage on fewer chips thus keeps the per-chip activations of the
    full mesh, and `config.steps` (optimiser updates) and the learning-rate schedule do not
    change with the mesh.
    """
    if config.train.grad_accum_steps != 0:
        return config
    shards = math.prod(sizes[a] for a in batch_mesh_axes(config))
    batch = config.train.global_batch_size
    _need(batch % shards == 0,
          f"train.grad_accum_steps=0 (automatic) needs train.global_batch_size {batch} to be a "
          f"multiple of the {shards} batch shards of mesh axes {batch_mesh_axes(config)}; "
          "change the batch or the mesh, or set grad_accum_steps")
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.train.grad_accum_steps = batch // shards
    return resolved


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Static checks of a training config (no devices needed); returns it.

    Raises ValueError naming the field and the fix; warns (LowPrecisionStorageWarning) when
    config.model.param_dtype is narrower than float32.
    """
    missing = [s for s in SECTIONS if s not in config]
    _need(not missing, f"config has no section(s) {missing}; a training config needs {SECTIONS}")
    dit_config.validate(config.model)
    _warn_low_precision_storage(config)
    for name in ("seed",):
        _int(config[name], name, lo=0)
    for name in ("steps", "log_every", "checkpoint_every"):
        _int(config[name], name)

    from tttjax.train.optimizer import SCHEDULES, TRAINABLE_SETS

    train = config.train
    _int(train.global_batch_size, "train.global_batch_size")
    _int(train.grad_accum_steps, "train.grad_accum_steps", lo=0)
    _int(train.max_nonfinite_in_a_row, "train.max_nonfinite_in_a_row")
    _need(train.grad_accum_steps == 0 or train.global_batch_size % train.grad_accum_steps == 0,
          f"config.train.global_batch_size {train.global_batch_size} must be divisible by "
          f"grad_accum_steps {train.grad_accum_steps}")
    _need(0.0 <= train.prompt_dropout <= 1.0,
          f"config.train.prompt_dropout must be in [0, 1], got {train.prompt_dropout}")
    _need(isinstance(train.get("compiler_options", {}), (dict, ml_collections.ConfigDict)),
          "config.train.compiler_options must be a dict of XLA options")
    _need(train.trainable in TRAINABLE_SETS,
          f"config.train.trainable {train.trainable!r} not in {TRAINABLE_SETS}")
    _need(train.trainable == "all" or config.model.mixer != "none",
          f"config.train.trainable={train.trainable!r} trains the mixer, but config.model.mixer "
          "is 'none'; set a mixer or trainable='all'")

    optim = config.optim
    _need(0.0 <= optim.b1 < 1.0 and 0.0 <= optim.b2 < 1.0,
          f"config.optim.b1/b2 must be in [0, 1), got {optim.b1}, {optim.b2}")
    _need(optim.eps > 0 and optim.weight_decay >= 0 and optim.grad_clip > 0,
          "config.optim needs eps > 0, weight_decay >= 0 and grad_clip > 0")
    _need(optim.mu_dtype in ("", "float32", "bfloat16"),
          f"config.optim.mu_dtype must be '', 'float32' or 'bfloat16', got {optim.mu_dtype!r}")
    for group in ("pretrained", "new"):
        g = optim[group]
        _need(isinstance(g.lr, (int, float)) and math.isfinite(g.lr) and g.lr >= 0,
              f"config.optim.{group}.lr must be a finite number >= 0, got {g.lr}")
        _need(g.schedule in SCHEDULES,
              f"config.optim.{group}.schedule {g.schedule!r} not in {SCHEDULES}")
        _int(g.warmup_steps, f"optim.{group}.warmup_steps", lo=0)
        _need(0.0 <= g.final_lr_fraction <= 1.0,
              f"config.optim.{group}.final_lr_fraction must be in [0, 1]")

    from tttjax.diffusion.schedule import NoiseSchedule

    try:
        NoiseSchedule(**config.diffusion.to_dict())
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.diffusion: {err}") from None

    _validate_data(config)
    _validate_mesh_static(config)
    _validate_observability(config)
    _validate_mixer_sequence(config)

    init_from = config.checkpoint.init_from
    _int(config.checkpoint.keep, "checkpoint.keep")
    _need(not init_from or storage.path(init_from).is_dir(),
          f"config.checkpoint.init_from={init_from!r} does not exist; give a converted "
          "checkpoint folder or a previous stage's workdir, or '' to start from scratch")
    return config


def _validate_mixer_sequence(config) -> None:
    """A TTT mini-batch longer than the mixer's whole sequence would only be padding (and
    memory: the padded sequence is what the inner loop runs on)."""
    m, s = config.model, config.stage
    mini_batch = dit_config.mixer_option(m, "mini_batch_size")
    if mini_batch is None:
        return
    video = s.latent_frames * (s.latent_height // m.patch_size) * (s.latent_width // m.patch_size)
    length = s.num_segments * s.text_length + video
    _need(mini_batch <= length,
          f"config.model.mixer_config.{m.mixer}.mini_batch_size {mini_batch} is longer than "
          f"the mixer's sequence ({length} tokens: {s.num_segments} x {s.text_length} text + "
          f"{video} video); use at most {length}")


def _validate_data(config) -> None:
    from tttjax.data.loader import DATASETS, toon_config

    data, stage, model = config.data, config.stage, config.model
    _need(data.dataset in DATASETS, f"config.data.dataset {data.dataset!r} not in {DATASETS}")
    _int(data.worker_count, "data.worker_count", lo=0)
    scale = data.get("latent_scale", 0.0)
    _need(isinstance(scale, (int, float)) and scale >= 0 and scale == scale,
          f"config.data.latent_scale must be a number >= 0 (0: the VAE's scaling factor, 1.0: the "
          f"seed code's), got {scale!r}")
    _int(stage.num_segments, "stage.num_segments")
    want_frames = model.prefix_frames + stage.num_segments * model.frames_per_segment
    _need(stage.latent_frames == want_frames,
          f"config.stage.latent_frames {stage.latent_frames} must be prefix_frames + num_segments "
          f"x frames_per_segment = {want_frames}")
    if data.dataset == "toon_storyboards":
        cfg = toon_config(data.builder_config, dict(data.builder_overrides))
        _need(model.in_channels >= 3,
              f"toy latents need config.model.in_channels >= 3, got {model.in_channels}")
        from tttjax.data.toy_latents import TOON_CODECS

        _need(data.get("toon_codec", "linear") in TOON_CODECS,
              f"config.data.toon_codec {data.get('toon_codec')!r} not in {TOON_CODECS}")
        _need(model.prefix_frames == 1,
              "toy latents keep one prefix frame; config.model.prefix_frames must be 1")
        _need(cfg.frames_per_segment == 4 * model.frames_per_segment,
              f"toon_storyboards/{data.builder_config} has {cfg.frames_per_segment} frames per "
              f"segment; toy latents compress time 4x, so config.model.frames_per_segment must be "
              f"{cfg.frames_per_segment / 4:g}")
        _need((cfg.height, cfg.width) == (8 * stage.latent_height, 8 * stage.latent_width),
              f"toon_storyboards/{data.builder_config} is {cfg.height}x{cfg.width}; toy latents "
              f"compress space 8x, so config.stage.latent_height/width must be "
              f"{cfg.height / 8:g}x{cfg.width / 8:g}")
        _need(stage.num_segments <= cfg.max_segments,
              f"config.stage.num_segments {stage.num_segments} > the dataset's max_segments "
              f"{cfg.max_segments}")
    else:
        from tttjax.data.loader import latents_config

        cfg = latents_config(data.builder_config, dict(data.builder_overrides))
        _need(cfg.latent_channels == model.in_channels and cfg.text_embed_dim ==
              model.text_embed_dim and cfg.text_length == stage.text_length
              and cfg.frames_per_segment == model.frames_per_segment
              and cfg.prefix_frames == model.prefix_frames,
              f"latents/{data.builder_config} (channels {cfg.latent_channels}, text "
              f"{cfg.text_length}x{cfg.text_embed_dim}, {cfg.frames_per_segment} frames per "
              "segment) does not match config.model / config.stage")


def _validate_mesh_static(config) -> None:
    axes = dict(config.mesh.axes)
    _need(axes, "config.mesh.axes is empty; give e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}")
    fill = [a for a, s in axes.items() if s == -1]
    _need(len(fill) <= 1, f"config.mesh.axes: at most one axis may be -1, got {fill}")
    bad = [a for a, s in axes.items() if s != -1 and (not isinstance(s, int) or s < 1)]
    _need(not bad, f"config.mesh.axes: sizes must be positive ints or -1, bad axes {bad}")
    _validate_rules(config.mesh.get("rules") or (), axes)
    from tttjax.sharding import INDIVISIBLE

    _need(config.mesh.get("indivisible", "warn") in INDIVISIBLE,
          f"config.mesh.indivisible {config.mesh.get('indivisible')!r} not in {INDIVISIBLE} (what "
          "happens when a mesh axis does not divide a parameter dimension)")
    _validate_dcn(config.mesh, axes)
    if not fill:
        _check_batch_divides(config, axes)


def _validate_dcn(mesh, axes: dict) -> None:
    """dcn_axes: {mesh axis: slices it spans}, known axes, one -1 at most; num_slices >= 0."""
    dcn = mesh.get("dcn_axes") or {}
    _need(isinstance(dcn, (dict, ml_collections.ConfigDict)),
          f"config.mesh.dcn_axes must be a dict {{mesh axis: slices}}, got {dcn!r}; e.g. "
          "{'data': -1}")
    dcn = dict(dcn)
    unknown = [a for a in dcn if a not in axes]
    _need(not unknown, f"config.mesh.dcn_axes names {unknown}, which config.mesh.axes "
          f"{sorted(axes)} does not have")
    _need(sum(s == -1 for s in dcn.values()) <= 1,
          f"config.mesh.dcn_axes {dcn}: at most one axis may be -1")
    bad = [a for a, s in dcn.items() if s != -1 and (not isinstance(s, int) or s < 1)]
    _need(not bad, f"config.mesh.dcn_axes: sizes must be positive ints or -1, bad axes {bad}")
    _int(mesh.get("num_slices", 0), "mesh.num_slices", lo=0)


def _validate_observability(config) -> None:
    """eval_every / eval, profile and compile_cache_dir (all optional)."""
    _int(config.get("eval_every", 0), "eval_every", lo=0)
    if config.get("eval_every", 0):
        _need("eval" in config, "config.eval_every is set but config has no eval section; add "
              "config.eval = dict(split='validation', batches=1, timesteps=(100, 500, 900), "
              "seed=0)")
        ev = config.eval
        _int(ev.batches, "eval.batches")
        _int(ev.seed, "eval.seed", lo=0)
        steps = config.diffusion.num_train_timesteps
        ts = tuple(ev.timesteps)
        _need(ts and all(isinstance(t, int) and 0 <= t < steps for t in ts),
              f"config.eval.timesteps must be ints in [0, {steps}), got {ts}")
        _need(isinstance(ev.split, str) and ev.split,
              f"config.eval.split must name a dataset split, got {ev.split!r}")
        _int(ev.get("video_steps", 0), "eval.video_steps", lo=0)
        _need(not ev.get("video_steps", 0) or config.data.dataset == "toon_storyboards",
              f"config.eval.video_steps={ev.get('video_steps')} samples the toon world, but "
              f"config.data.dataset is {config.data.dataset!r} (its latents need the CogVideoX "
              "VAE to be seen); set config.eval.video_steps=0")
    else:
        video_steps = config.get("eval", {}).get("video_steps", 0)
        _int(video_steps, "eval.video_steps", lo=0)
        _need(not video_steps, f"config.eval.video_steps={video_steps} but config.eval_every "
              "is 0, so no evaluation (and no video) runs; set config.eval_every too")
    profile = config.get("profile")
    if profile is not None:
        _int(profile.start_step, "profile.start_step", lo=0)
        _int(profile.num_steps, "profile.num_steps", lo=0)
        _need(isinstance(profile.all_hosts, bool),
              f"config.profile.all_hosts must be True or False, got {profile.all_hosts!r}")
    _need(isinstance(config.get("compile_cache_dir", ""), str),
          "config.compile_cache_dir must be a path, '' (WORKDIR/compile_cache) or 'none'")


def _validate_rules(rules, axes: dict) -> None:
    """Each override is (logical name, mesh axis | tuple of mesh axes | None), on known axes."""
    example = "e.g. (('activation_length', 'tensor'),)"
    for rule in rules:
        _need(isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str),
              f"config.mesh.rules: each rule is a (logical axis, mesh axes) pair, got {rule!r}; "
              f"{example}")
        targets = rule[1] if isinstance(rule[1], (list, tuple)) else (rule[1],)
        unknown = [t for t in targets if t is not None and t not in axes]
        _need(not unknown, f"config.mesh.rules: rule {tuple(rule)!r} names mesh axes {unknown} "
              f"that config.mesh.axes {sorted(axes)} does not have")


def _check_batch_divides(config, axes: dict) -> None:
    config = resolve_accumulation(config, axes)
    shards = math.prod(axes[a] for a in batch_mesh_axes(config))
    micro = micro_batch_size(config)
    _need(micro % shards == 0,
          f"the micro-batch ({config.train.global_batch_size} / {config.train.grad_accum_steps} "
          f"accumulation steps = {micro}) must be divisible by the {shards} batch shards of mesh "
          f"axes {batch_mesh_axes(config)}; change train.global_batch_size or config.mesh.axes")


def mesh_device_count(config, available: int, process_count: int = 1) -> int:
    """Devices the run's mesh uses: all, or config.mesh.num_devices of them."""
    n = config.mesh.get("num_devices", 0) or 0
    _int(n, "mesh.num_devices", lo=0)
    _need(n <= available, f"config.mesh.num_devices={n} but only {available} devices are present")
    _need(n in (0, available) or process_count == 1,
          "config.mesh.num_devices must be 0 (all devices) in a multi-process run")
    return n or available


def validate_mesh(config, num_devices: int) -> dict[str, int]:
    """Resolved mesh axis sizes for `num_devices`; ValueError when they cannot fit."""
    from tttjax.sharding import resolve_mesh_shape

    sizes = resolve_mesh_shape(dict(config.mesh.axes), num_devices)
    _check_batch_divides(config, sizes)
    return sizes


def mesh_layout(config) -> dict:
    """The `make_mesh` keywords of config.mesh that place the axes over TPU slices."""
    return {"dcn_axes": dict(config.mesh.get("dcn_axes") or {}) or None,
            "num_slices": config.mesh.get("num_slices", 0) or 0}


def rules(config) -> tuple:
    """The run's logical axis rules."""
    return _rules(config)
