"""CogVideoX-5B with the paper's integration, one config per fine-tuning stage.

    get_config("stage=63s,mixer=ttt_mlp")   stage in {3s, 9s, 18s, 30s, 63s}; mixer "none"
                                            or a registered name (ttt_mlp, ttt_linear, ...)
    get_config("63s,ttt_mlp")               the same, positional

`config.model` is the network (tttjax.models.dit_config), `config.stage` the video geometry of
the stage (480x720 video -> 60x90 latents -> 30x45 = 1350 tokens per latent frame; one
226-token T5 prompt per 3-second segment).
"""

import ml_collections

from tttjax import config_base as base
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
    args = base.parse_arguments(arg, "cogvideox_5b", {"stage": base.REQUIRED,
                                                      "mixer": base.REQUIRED})
    stage, mixer = args["stage"], args["mixer"]
    segments = dit_config.STAGE_SEGMENTS.get(stage)
    if segments is None:
        raise ValueError(f"cogvideox_5b: unknown stage {stage!r}; choose one of "
                         f"{sorted(dit_config.STAGE_SEGMENTS)}")

    config = base.get_config()
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
    config.steps = recipe["steps"]
    config.checkpoint_every = 250
    # The plain DiT (mixer none) trains everything at every stage. This follows the config
    # argument only: from 9s on, choose the mixer there (9s,ttt_mlp), or also pass
    # --config.train.trainable=mixer_qkvo with --config.model.mixer.
    # grad_accum_steps 0: as many micro-batches (accumulated inside the step) as give one
    # example per batch shard, the paper's 4 devices per example: none on 256 chips, 2 on
    # a 128-chip v5p-256. config.steps counts optimiser updates on any mesh.
    config.train.update(global_batch_size=64, grad_accum_steps=0,
                        trainable=recipe["trainable"] if mixer != "none" else "all")
    config.optim.mu_dtype = "float32"
    config.optim.pretrained.update(lr=1e-5, schedule="constant", warmup_steps=recipe["warmup"])
    config.optim.new.update(lr=recipe["lr_new"], schedule=recipe["schedule_new"],
                            warmup_steps=recipe["warmup"],
                            final_lr_fraction=recipe.get("final_new", 0.0))
    config.data.update(dataset="latents", builder_config="cogvideox5b", worker_count=4)
    # 64 examples per batch over data x fsdp; each example's model split 4 ways over tensor
    # (256 devices: 8 x 8 x 4, the paper's 256 H100s). Override for other device counts.
    # Sequence parallelism: the activations between blocks (and those saved for the backward
    # pass) are split over `tensor` along the tokens, 4x less than replicated; from 9 s on the
    # memory plan does not fit without it (README, "memory plan of the 5B stages").
    config.mesh.axes = dict(data=-1, fsdp=8, tensor=4)
    config.mesh.rules = (("activation_length", "tensor"),)
    # a weight replicated because an axis does not divide it costs memory on every chip
    config.mesh.indivisible = "error"
    # init_from: the converted CogVideoX-5B checkpoint for 3s, the previous stage's workdir after.
    config.eval_every = 500
    config.eval.batches = 2
    config.profile.start_step = 10
    return config
