"""Training data: TFDS builders read through Grain, and what turns examples into DiT inputs.

  toon_world, toon_render   the procedural cat-and-mouse cartoon and its PIL renderer
  toon_storyboards          TFDS builder of toon episodes (generated locally, no download)
  latents                   TFDS builder of pre-computed VAE latents + text embeddings
  text_encoder              download-free hashed word embeddings (the T5 interface)
  toy_latents               fixed linear "VAE" for toon videos, with its exact pseudo-inverse
  windows                   n-segment training clips cut from longer videos
  sampler                   Grain sampler giving each host contiguous rows of a global batch
  loader                    datasets -> per-host Grain loaders of model inputs
"""
