"""A short sample video of a held-out toon storyboard, for TensorBoard at every evaluation.

    config.eval_every = 500
    config.eval.video_steps = 8          # sampler steps; 0 = no video (the default)

For the toon world (`data.dataset = "toon_storyboards"`) the trainer samples, every
`eval_every` steps, the storyboard of the first window of `config.eval.split` (its prompts
with scene markers, embedded as in training; empty negative prompts, as `python -m
tttjax.sample` uses) with `video_steps` DPM-Solver++(2M) SDE steps, the sample command's
guidance (rising 1 -> 4) and fixed noise (`config.eval.seed`), then decodes the latents with
the run's toon codec (`data.toon_codec`). TensorBoard gets one image per evaluation,
`eval/video`: the held-out clip's real frames on top, the sample below, frame by frame left
to right (a frame strip needs no video encoder), and the storyboard's captions as text.
Because noise and prompts are fixed, successive images differ only by the parameters.

The sampler loop is compiled once when the run starts, next to the train step (ahead of
time, for the parameters' shardings), never at an evaluation. Every process runs it (the
parameters are sharded over all of them); process 0 writes the image.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tttjax.data import loader as data_loader
from tttjax.data.text_encoder import HashedTextEncoder
from tttjax.diffusion.guidance import Guidance
from tttjax.diffusion.samplers import sample
from tttjax.diffusion.schedule import NoiseSchedule

MAX_FRAMES = 24    # wider strips are subsampled evenly


class EvalVideo:
    """Samples the held-out storyboard with the current parameters (see the module doc)."""

    def __init__(self, config, mesh, rules, spec):
        from tttjax.generation import ToyDecoder

        held_out = copy.deepcopy(config)
        with held_out.unlocked():
            held_out.data.split = config.eval.split
        source, transform = data_loader.open_training_source(held_out)
        if len(source) == 0:
            raise ValueError(f"config.eval.split {config.eval.split!r} has no examples of "
                             f"{config.stage.num_segments} segments for the eval video; choose "
                             "another split or set config.eval.video_steps=0")
        window = source[0]
        example = transform.map(window)
        self.truth = np.asarray(window["video"], np.uint8)              # [F, H, W, 3]
        self.captions = [c.decode() if isinstance(c, bytes) else str(c)
                         for c in window["captions"]]
        cond = np.asarray(example["text"], np.float32)[None]            # [1, n, S, D]
        encoder = HashedTextEncoder(config.model.text_embed_dim,
                                    seed=config.data.text_encoder_seed)
        uncond = encoder.encode([""] * cond.shape[1], cond.shape[2])[None].astype(np.float32)
        latents_shape = (1, *np.shape(example["latents"]))               # [1, T, C, h, w]
        self.decoder = ToyDecoder(config.model.in_channels, config.data.toy_latent_seed,
                                  config.data.get("toon_codec", "linear"))
        self.steps = int(config.eval.video_steps)

        replicated = NamedSharding(mesh, PartitionSpec())
        as_global = lambda x: jax.make_array_from_process_local_data(replicated, x)  # noqa: E731
        self._cond, self._uncond = as_global(cond), as_global(uncond)
        schedule = NoiseSchedule(**config.diffusion.to_dict())
        key_seed, steps = int(config.eval.seed), self.steps

        def video_latents(params, cond, uncond):
            return sample(lambda x, text, t: spec.apply(params, x, text, t), latents_shape,
                          cond, uncond, key=jax.random.key(key_seed), steps=steps,
                          sampler="dpm++2m_sde", guidance=Guidance(), schedule=schedule)

        text = jax.ShapeDtypeStruct(cond.shape, np.float32, sharding=replicated)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            self._sample = jax.jit(
                video_latents, in_shardings=(spec.shardings, replicated, replicated),
                out_shardings=replicated,
                compiler_options=dict(config.train.compiler_options) or None,
            ).lower(spec.abstract, text, text).compile()

    def __call__(self, params) -> np.ndarray:
        """uint8 [2 H, k W, 3]: the real clip above the sample, k <= MAX_FRAMES frames."""
        latents = self._sample(params, self._cond, self._uncond)
        latents = np.asarray(latents.addressable_data(0))[0]             # replicated
        return frame_strip(self.truth, self.decoder.decode(latents))


def frame_strip(*videos: np.ndarray) -> np.ndarray:
    """uint8 [rows * H, k * W, 3] of videos uint8 [F, H, W, 3] (one row each, the same
    F frames picked evenly from each: all when F <= MAX_FRAMES)."""
    count = min(len(v) for v in videos)
    pick = np.unique(np.linspace(0, count - 1, min(count, MAX_FRAMES)).round().astype(int))
    return np.concatenate([np.concatenate(list(v[pick]), axis=1) for v in videos], axis=0)
