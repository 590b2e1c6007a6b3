"""A tiny CogVideoX-shaped DiT for CPU tests and smoke runs.

    get_config("ttt_mlp")        mixer name ("none" for the plain DiT)
    get_config("ttt_mlp,3")      ... and the number of segments (default 2)

Two blocks of width 64 (4 heads x 16), 8x8 latents of 4 channels (patch 2: 16 tokens per
frame), 2 latent frames per segment plus the prefix frame, 8-token prompts of width 32.
"""

import ml_collections

from tttjax.models import dit_config

# Per-mixer settings, stored as config.model.mixer_config.<mixer>: the mixer reads the sub-dict
# of its own name, so `tiny.py:ttt_mlp` and `tiny.py --config.model.mixer=ttt_mlp` are one config.
# impl "xla": the lax.scan inner loop (--config.model.mixer_config.ttt_mlp.impl=auto for the
# Pallas kernel where the devices have one).
MIXER_CONFIGS = {
    "ttt_mlp": dict(mini_batch_size=16, base_lr=0.1, remat_group_size=2, impl="xla"),
    "ttt_linear": dict(mini_batch_size=16, base_lr=1.0, remat_group_size=2, impl="xla"),
}


def get_config(arg: str = "none") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "none").split(",") if p.strip()] or ["none"]
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"tiny: config argument must be 'MIXER[,SEGMENTS]', got {arg!r}")
    mixer = parts[0]
    segments = int(parts[1]) if len(parts) == 2 else 2

    config = ml_collections.ConfigDict()
    model = dit_config.cogvideox_5b()
    model.update(dict(
        num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=4,
        out_channels=4, text_embed_dim=32, time_embed_dim=32, sample_height=8, sample_width=8,
        frames_per_segment=2, prefix_frames=1, mixer=mixer, attention="segment",
    ))
    model.mixer_config = ml_collections.ConfigDict(MIXER_CONFIGS)
    config.model = dit_config.validate(model)

    config.stage = ml_collections.ConfigDict(dict(
        name=f"tiny{segments}",
        num_segments=segments,
        latent_frames=2 * segments + 1,
        latent_height=8,
        latent_width=8,
        text_length=8,
    ))

    # --- training (fields documented in tttjax.train.config) ---
    # The tiny model starts from random weights, so both parameter groups use a large rate.
    config.seed = 0
    config.steps = 200                 # train steps (optimiser updates)
    config.log_every = 10
    config.checkpoint_every = 100
    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=8, grad_accum_steps=1, prompt_dropout=0.1, trainable="all",
        max_nonfinite_in_a_row=20, progress_bar=True,
        compiler_options={}))
    config.optim = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip=0.1, mu_dtype="",
        pretrained=dict(lr=2e-3, schedule="constant", warmup_steps=10, final_lr_fraction=0.0),
        new=dict(lr=2e-3, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)))
    config.diffusion = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", snr_shift_scale=1.0, zero_terminal_snr=True))
    config.data = ml_collections.ConfigDict(dict(
        dataset="toon_storyboards", builder_config="tiny", builder_overrides={}, data_dir="",
        manual_dir="", split="train", shuffle=True, worker_count=0, text_encoder_seed=0,
        toy_latent_seed=0, toon_codec="linear"))
    config.mesh = ml_collections.ConfigDict(dict(axes=dict(data=-1, fsdp=1, tensor=1), rules=(),
                                                  num_devices=0, dcn_axes=dict(data=-1),
                                                  num_slices=0))
    config.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True, init_from=""))
    # Observability (tttjax.train.config): held-out loss every eval_every steps (0: never),
    # a jax.profiler trace of profile.num_steps steps (0: none), the persistent XLA cache.
    config.eval_every = 0
    config.eval = ml_collections.ConfigDict(dict(split="validation", batches=1,
                                                  timesteps=(100, 500, 900), seed=0))
    config.profile = ml_collections.ConfigDict(dict(start_step=3, num_steps=0, all_hosts=False))
    config.compile_cache_dir = ""
    return config
