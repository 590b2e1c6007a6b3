"""tttjax: test-time-training layers and long-video Diffusion Transformers in JAX.

Layout:
  tttjax.ops     pure functions (TTT inner loops, baselines, attention, RoPE)
  tttjax.layers  Flax NNX modules wrapping the ops
  tttjax.models  models composed of layers (the CogVideoX-style DiT)
"""

__version__ = "0.1.0"

import flax as _flax

# tttjax annotates parameters with *logical* axis names and resolves them to mesh axes with
# the config's rules when a run places its state (`tttjax.sharding.state_shardings`), as
# MaxText does. Flax's eager variable sharding would instead demand a mesh at construction
# time, which breaks building models on one CPU device or under `nnx.eval_shape`.
_flax.config.update("flax_always_shard_variable", False)
