"""CogVideoX-5B with the paper's integration, one config per fine-tuning stage.

    get_config("3s,ttt_mlp")   stage in {3s, 9s, 18s, 30s, 63s}, mixer "none" or a registered
                               mixer name (ttt_mlp, ttt_linear, ...)

`config.model` is the network (tttjax.models.dit_config), `config.stage` the video geometry of
the stage (480x720 video -> 60x90 latents -> 30x45 = 1350 tokens per latent frame; one
226-token T5 prompt per 3-second segment).
"""

import ml_collections

from tttjax.models import dit_config

# Per-mixer settings of the paper (docs/design.md §1); other mixers use their registry defaults.
# Stored as config.model.mixer_config.<mixer> for every mixer: the chosen mixer reads the
# sub-dict of its own name, so `--config.model.mixer=...` picks its settings up too.
# impl "auto": the fused Pallas kernel on TPU (Mosaic) and GPU (Triton) where the shape allows,
# the XLA scan elsewhere; chosen by the devices the step is compiled for.
# context_axis: a mesh axis to run the TTT scan context-parallel over (each device scans its
# span of the sequence, the inner state passes device to device), or None for heads split
# over `tensor` with the whole sequence on every device ("": the default).
MIXER_CONFIGS = {
    "ttt_mlp": dict(mini_batch_size=64, base_lr=0.1, remat_group_size=16, impl="auto",
                    context_axis=""),
    "ttt_linear": dict(mini_batch_size=16, base_lr=1.0, remat_group_size=16, impl="auto",
                       context_axis=""),
}

# Longer stages save less per block for the backward pass (docs/design.md §5).
STAGE_REMAT = {"3s": "save_block_outputs", "9s": "full", "18s": "full", "30s": "full",
               "63s": "full"}

# docs/design.md §5: trainable set, new-parameter rate and schedule, steps, warmup per stage
# (the pretrained rate is 1e-5 constant throughout; 30 s uses the top of its 500-1000 range).
STAGE_RECIPE = {
    "3s": dict(trainable="all", lr_new=1e-4, schedule_new="cosine", steps=5000, warmup=100,
               final_new=0.1),   # cosine 1e-4 -> 1e-5, as the seed code (docs/design.md §8)
    "9s": dict(trainable="mixer_qkvo", lr_new=1e-5, schedule_new="constant", steps=5000, warmup=100),
    "18s": dict(trainable="mixer_qkvo", lr_new=1e-5, schedule_new="constant", steps=1000, warmup=50),
    "30s": dict(trainable="mixer_qkvo", lr_new=1e-5, schedule_new="constant", steps=1000, warmup=50),
    "63s": dict(trainable="mixer_qkvo", lr_new=1e-5, schedule_new="constant", steps=250, warmup=25),
}


def get_config(arg: str = "3s,ttt_mlp") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if len(parts) != 2:
        raise ValueError(f"cogvideox_5b: config argument must be 'STAGE,MIXER' (e.g. '3s,ttt_mlp'), "
                         f"got {arg!r}")
    stage, mixer = parts
    segments = dit_config.STAGE_SEGMENTS.get(stage)
    if segments is None:
        raise ValueError(f"cogvideox_5b: unknown stage {stage!r}; choose one of "
                         f"{sorted(dit_config.STAGE_SEGMENTS)}")

    config = ml_collections.ConfigDict()
    model = dit_config.cogvideox_5b()
    model.mixer = mixer
    model.mixer_config = ml_collections.ConfigDict(MIXER_CONFIGS)
    model.attention = "segment"
    # bf16 compute from float32 master weights: AdamW updates at 1e-5 / 1e-4 are below a bf16
    # weight's rounding step and would mostly be lost (tttjax.train.config warns about bf16
    # storage). optax keeps Adam's second moment in this dtype; optim.mu_dtype sets the first.
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.remat_policy = STAGE_REMAT[stage]
    # cuDNN flash attention on GPUs, the online softmax over key blocks on TPUs (no logits
    # stored either way); chosen by the devices the step is compiled for.
    model.attention_impl = "auto"
    config.model = dit_config.validate(model)

    config.stage = ml_collections.ConfigDict(dict(
        name=stage,
        num_segments=segments,
        latent_frames=dit_config.stage_latent_frames(stage),
        latent_height=60,
        latent_width=90,
        text_length=226,
    ))

    # --- training: docs/design.md §5 (fields documented in tttjax.train.config) ---
    recipe = STAGE_RECIPE[stage]
    config.seed = 0
    config.steps = recipe["steps"]
    config.log_every = 10
    config.checkpoint_every = 250
    # The plain DiT (mixer none) trains everything at every stage. This follows the config
    # argument only: from 9s on, choose the mixer there (9s,ttt_mlp), or also pass
    # --config.train.trainable=mixer_qkvo with --config.model.mixer.
    # grad_accum_steps 0: as many micro-batches (accumulated inside the step) as give one
    # example per batch shard, the paper's 4 devices per example: none on 256 chips, 2 on
    # a 128-chip v5p-256. config.steps counts optimiser updates on any mesh.
    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=64, grad_accum_steps=0, prompt_dropout=0.1,
        trainable=recipe["trainable"] if mixer != "none" else "all",
        max_nonfinite_in_a_row=20, progress_bar=True,
        compiler_options={}))
    config.optim = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip=0.1, mu_dtype="float32",
        pretrained=dict(lr=1e-5, schedule="constant", warmup_steps=recipe["warmup"],
                        final_lr_fraction=0.0),
        new=dict(lr=recipe["lr_new"], schedule=recipe["schedule_new"],
                 warmup_steps=recipe["warmup"], final_lr_fraction=recipe.get("final_new", 0.0))))
    config.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", snr_shift_scale=1.0, zero_terminal_snr=True))
    config.data = ml_collections.ConfigDict(dict(
        dataset="latents", builder_config="cogvideox5b", builder_overrides={}, data_dir="",
        manual_dir="", split="train", shuffle=True, worker_count=4, text_encoder_seed=0,
        toy_latent_seed=0,
        # VAE latents x latent_scale feed the model; 0: the VAE's scaling factor recorded in
        # the dataset (0.7 for CogVideoX-5B); 1.0: the seed code's (docs/design.md §8).
        latent_scale=0.0))
    # 64 examples per batch over data x fsdp; each example's model split 4 ways over tensor
    # (256 devices: 8 x 8 x 4, the paper's 256 H100s). Override for other device counts.
    # Sequence parallelism: the activations between blocks (and those saved for the backward
    # pass) are split over `tensor` along the tokens, 4x less than replicated; from 9 s on the
    # memory plan does not fit without it (README, "memory plan of the 5B stages").
    config.mesh = ml_collections.ConfigDict(dict(axes=dict(data=-1, fsdp=8, tensor=4),
                                                  rules=(("length", "tensor"),), num_devices=0,
                                                  dcn_axes=dict(data=-1), num_slices=0,
                                                  # a weight replicated because an axis does
                                                  # not divide it costs memory on every chip
                                                  indivisible="error"))
    # init_from: the converted CogVideoX-5B checkpoint for 3s, the previous stage's workdir after.
    config.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True, init_from=""))
    # Observability (tttjax.train.config): held-out loss every eval_every steps (0: never),
    # a jax.profiler trace of profile.num_steps steps (0: none), the persistent XLA cache.
    config.eval_every = 500
    config.eval = ml_collections.ConfigDict(dict(split="validation", batches=2,
                                                  timesteps=(100, 500, 900), seed=0))
    config.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0, all_hosts=False))
    config.compile_cache_dir = ""
    return config
