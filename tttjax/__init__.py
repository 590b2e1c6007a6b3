"""tttjax: test-time-training layers and long-video Diffusion Transformers in JAX.

Layout:
  tttjax.ops     pure functions (TTT inner loops, baselines, attention, RoPE)
  tttjax.layers  Flax NNX modules wrapping the ops
  tttjax.models  models composed of layers (the CogVideoX-style DiT)

Importing tttjax changes no global JAX or Flax setting: parameters carry logical axis names
and `eager_sharding=False` themselves (`tttjax.logical_params`), and a run places them with
its mesh and rules (`tttjax.sharding.state_shardings`).
"""

__version__ = "0.1.0"
