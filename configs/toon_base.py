"""The toon world's pretrained base: a small plain DiT trained long on 3-second toon clips.

    python -m tttjax.train --config configs/toon_base.py --workdir /tmp/toon_base
    python -m tttjax.models.toon_base --export /tmp/toon_base   # -> the shipped weights

It plays CogVideoX's part in the paper's recipe at toy scale: a video DiT pretrained on
single 3-second segments, with no TTT layer. `python -m tttjax.demo` starts from its shipped
weights (`tttjax/models/toon_base_weights`), adds the TTT-MLP layers (fresh, gated) and
fine-tunes on 3-segment stories, as the paper's 9-second stage does.

The network is `configs/tiny.py`'s latent geometry and text width with 4 blocks of width 128
(8 heads x 16) instead of 2 of width 64: 1.0 M parameters, 6x tiny's. The tiny network
learned the rooms but drew the characters as blobs; this one, at 0.8x its steps per second
on 2 CPU cores (small models there are bound by per-operation cost, not FLOPs), reaches a
lower loss (0.24 against 0.31) and draws them better formed, though not yet reliably
recognisable (README). Prompts are 24 words, as the demo reads them. The data is a larger
toon world (16384 episodes instead of 2048) because the base trains for many epochs. 80-95
minutes on 2 CPU cores.
"""

import ml_collections

from tttjax.configs import tiny


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"toon_base takes no argument, got {arg!r}")
    config = tiny.get_config("none,1")
    config.model.num_layers = 4
    config.model.num_attention_heads = 8
    config.stage.name = "toon_base"
    config.stage.text_length = 24
    config.data.toon_codec = "learned"
    config.data.builder_overrides = ml_collections.ConfigDict(dict(num_train=16384))
    config.train.global_batch_size = 16
    config.steps = 24000
    config.log_every = 200
    config.checkpoint_every = 2500
    # Long from-scratch training: every parameter is "pretrained" (there is no mixer), so the
    # decay this run needs goes on that group.
    config.optim.pretrained.update(lr=2e-3, warmup_steps=200, schedule="cosine",
                                   final_lr_fraction=0.05)
    return config
