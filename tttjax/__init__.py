"""tttjax: test-time-training layers and long-video Diffusion Transformers in JAX.

Layout:
  tttjax.ops     pure functions (TTT inner loops, baselines, attention, RoPE)
  tttjax.layers  Flax NNX modules wrapping the ops
  tttjax.models  models composed of layers (the CogVideoX-style DiT)
"""

__version__ = "0.1.0"
