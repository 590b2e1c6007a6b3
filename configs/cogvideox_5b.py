"""CogVideoX-5B with the paper's integration, one config per fine-tuning stage.

    get_config("3s,ttt_mlp")   stage in {3s, 9s, 18s, 30s, 63s}, mixer "none" or a registered
                               mixer name (ttt_mlp, ttt_linear, ...)

`config.model` is the network (tttjax.models.dit_config), `config.stage` the video geometry of
the stage (480x720 video -> 60x90 latents -> 30x45 = 1350 tokens per latent frame; one
226-token T5 prompt per 3-second segment).
"""

import ml_collections

from tttjax.models import dit_config

# Per-mixer settings of the paper (SPEC section 1); other mixers use their registry defaults.
MIXER_CONFIGS = {
    "ttt_mlp": dict(mini_batch_size=64, base_lr=0.1, remat_group_size=16),
    "ttt_linear": dict(mini_batch_size=16, base_lr=1.0, remat_group_size=16),
}

# Longer stages save less per block for the backward pass (SPEC section 5).
STAGE_REMAT = {"3s": "save_block_outputs", "9s": "full", "18s": "full", "30s": "full",
               "63s": "full"}


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
    model.mixer_config = ml_collections.ConfigDict(MIXER_CONFIGS.get(mixer, {}))
    model.attention = "segment"
    model.dtype = "bfloat16"
    model.param_dtype = "bfloat16"
    model.remat_policy = STAGE_REMAT[stage]
    model.attention_impl = "cudnn"
    config.model = dit_config.validate(model)

    config.stage = ml_collections.ConfigDict(dict(
        name=stage,
        num_segments=segments,
        latent_frames=dit_config.stage_latent_frames(stage),
        latent_height=60,
        latent_width=90,
        text_length=226,
    ))
    return config
