"""A tiny CogVideoX-shaped DiT for CPU tests and smoke runs.

    get_config("mixer=ttt_mlp")              mixer name ("none", the default: the plain DiT)
    get_config("mixer=ttt_mlp,segments=3")   ... and the number of 3-second segments (2)
    get_config("ttt_mlp,3")                  the same, positional

Two blocks of width 64 (4 heads x 16), 8x8 latents of 4 channels (patch 2: 16 tokens per
frame), 2 latent frames per segment plus the prefix frame, 8-token prompts of width 32.
"""

import ml_collections

from tttjax import config_base as base
from tttjax.models import dit_config

# Per-mixer settings, stored as config.model.mixer_config.<mixer>: the mixer reads the sub-dict
# of its own name, so `tiny:ttt_mlp` and `tiny --config.model.mixer=ttt_mlp` are one config.
# impl "xla": the lax.scan inner loop (--config.model.mixer_config.ttt_mlp.impl=auto for the
# Pallas kernel where the devices have one).
MIXER_CONFIGS = {
    "ttt_mlp": dict(mini_batch_size=16, base_lr=0.1, remat_group_size=2, impl="xla"),
    "ttt_linear": dict(mini_batch_size=16, base_lr=1.0, remat_group_size=2, impl="xla"),
}


def get_config(arg: str = "none") -> ml_collections.ConfigDict:
    args = base.parse_arguments(arg, "tiny", {"mixer": "none", "segments": 2})
    segments = args["segments"]
    if segments < 1:
        raise ValueError(f"tiny: segments must be >= 1, got {segments}")

    config = base.get_config()
    model = dit_config.cogvideox_5b()
    model.update(dict(
        num_layers=2, num_attention_heads=4, attention_head_dim=16, in_channels=4,
        out_channels=4, text_embed_dim=32, time_embed_dim=32, sample_height=8, sample_width=8,
        frames_per_segment=2, prefix_frames=1, mixer=args["mixer"], attention="segment",
    ))
    model.mixer_config = ml_collections.ConfigDict(MIXER_CONFIGS)
    config.model = dit_config.validate(model)

    config.stage = ml_collections.ConfigDict(dict(
        name=f"tiny{segments}",
        num_segments=segments,
        latent_frames=dit_config.latent_frames(config.model, segments),
        latent_height=8,
        latent_width=8,
        text_length=8,
    ))

    # The tiny model starts from random weights, so both parameter groups use a large rate.
    config.optim.pretrained.update(lr=2e-3, warmup_steps=10)
    config.optim.new.update(lr=2e-3, warmup_steps=10, final_lr_fraction=0.1)
    return config
