"""A tiny CogVideoX-shaped DiT for CPU tests and smoke runs.

    get_config("ttt_mlp")        mixer name ("none" for the plain DiT)
    get_config("ttt_mlp,3")      ... and the number of segments (default 2)

Two blocks of width 64 (4 heads x 16), 8x8 latents of 4 channels (patch 2: 16 tokens per
frame), 2 latent frames per segment plus the prefix frame, 8-token prompts of width 32.
"""

import ml_collections

from tttjax.models import dit_config

MIXER_CONFIGS = {
    "ttt_mlp": dict(mini_batch_size=16, base_lr=0.1, remat_group_size=2),
    "ttt_linear": dict(mini_batch_size=16, base_lr=1.0, remat_group_size=2),
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
    model.mixer_config = ml_collections.ConfigDict(MIXER_CONFIGS.get(mixer, {}))
    config.model = dit_config.validate(model)

    config.stage = ml_collections.ConfigDict(dict(
        name=f"tiny{segments}",
        num_segments=segments,
        latent_frames=2 * segments + 1,
        latent_height=8,
        latent_width=8,
        text_length=8,
    ))
    return config
