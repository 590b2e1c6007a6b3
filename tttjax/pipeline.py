"""Prompt to video in a few lines, in the shape of a diffusers pipeline call.

    from tttjax.pipeline import TTTVideoPipeline

    pipe = TTTVideoPipeline.from_pretrained("/runs/tiny")      # a training workdir, a converted
                                                               # checkpoint or an exported folder
    out = pipe(prompts=["The cat walks to the right.",          # one prompt per 3-second segment
                        "The mouse hops up and down."],
               negative_prompt="blurry", seed=0, num_inference_steps=50)
    out.frames    # uint8 [T, H, W, 3]
    out.latents   # float32 [t, C, h, w], the sampled DiT latents

`seed=[0, 1, 2]` gives a batch: `frames` [S, T, H, W, 3] and `latents` [S, t, C, h, w], where
video i is exactly the one `seed=seeds[i]` alone gives (one sampler run per seed; the
compiled sampler is shared). The pipeline is `tttjax.generation` (`load_generator`,
`generate`) with a list of prompts in place of a storyboard file; `python -m tttjax.sample
--prompt ... --prompt ...` is the same on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tttjax.storyboard import Storyboard, parse_storyboard


def prompts_storyboard(prompts: Sequence[str], negative_prompt: str | Sequence[str] = "",
                       scene_transitions: Sequence[bool] | None = None) -> Storyboard:
    """The storyboard of one segment per prompt (validated like a storyboard file).

    Args:
      prompts: one caption per 3-second segment.
      negative_prompt: one for every segment, or one per segment.
      scene_transitions: per segment, whether it opens a new scene (default none does).
    Raises:
      `tttjax.storyboard.StoryboardError` (a ValueError) naming the bad prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    n = len(prompts)
    negatives = ([negative_prompt] * n if isinstance(negative_prompt, str) or negative_prompt is None
                 else list(negative_prompt))
    flags = [False] * n if scene_transitions is None else list(scene_transitions)
    if len(negatives) != n or len(flags) != n:
        raise ValueError(f"{n} prompt(s) but {len(negatives)} negative prompt(s) and "
                         f"{len(flags)} scene transition flag(s); give one per prompt")
    return parse_storyboard([{"text": p, "neg_text": neg, "requires_scene_transition": flag}
                             for p, neg, flag in zip(prompts, negatives, flags)],
                            source="prompts")


@dataclasses.dataclass
class TTTVideoPipelineOutput:
    frames: np.ndarray     # uint8 [T, H, W, 3], or [S, T, H, W, 3] for a list of S seeds
    latents: np.ndarray    # float32 [t, C, h, w], or [S, t, C, h, w]
    fps: float             # frames per second of the video
    seeds: list[int]       # the seed of each video


class TTTVideoPipeline:
    """A loaded DiT with its text encoder and latent decoder (`tttjax.generation.Generator`)."""

    def __init__(self, generator):
        self.generator = generator

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> TTTVideoPipeline:
        """Loads a training workdir, a converted checkpoint folder or a folder written by
        `python -m tttjax.export` (local paths or `gs://` URLs).

        An exported folder samples exactly as the checkpoint it was exported from (its
        `tttjax_generation.json` names the text encoder, decoder, schedule and sizes).
        `kwargs` go to `tttjax.generation.load_generator`: `vae=` and `text_encoder=` folders
        for checkpoints trained on real latents or converted from CogVideoX, `text_length=`,
        `mesh_axes=`. Raises ValueError naming what is missing.
        """
        from tttjax.generation import load_generator

        return cls(load_generator(path, **kwargs))

    def __call__(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 seed: int | Sequence[int] = 0, num_inference_steps: int = 50,
                 guidance: Any = None, sampler: str = "dpm++2m_sde",
                 scene_transitions: Sequence[bool] | None = None,
                 progress: Callable[[int], Any] | None = None) -> TTTVideoPipelineOutput:
        """Samples a video of `len(prompts)` segments for `seed` (an int or a list of ints).

        `guidance`: a constant scale (float), a `tttjax.diffusion.guidance.Guidance`
        schedule, or None for the default schedule (rising 1 -> 4, the paper's). `progress`
        is called after each sampler step of each seed.
        """
        from tttjax.diffusion.guidance import Guidance
        from tttjax.generation import generate

        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        storyboard = prompts_storyboard(prompts, negative_prompt, scene_transitions)
        seeds = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
        if not seeds:
            raise ValueError("seed is an empty list; give an int or at least one seed")
        videos = [generate(self.generator, storyboard, seed=s, steps=num_inference_steps,
                           sampler=sampler, guidance=Guidance() if guidance is None else guidance,
                           progress=progress) for s in seeds]
        frames = np.stack([v.frames for v in videos])
        latents = np.stack([v.latents for v in videos])
        if np.ndim(seed) == 0:
            frames, latents = frames[0], latents[0]
        return TTTVideoPipelineOutput(frames=frames, latents=latents, fps=videos[0].fps,
                                      seeds=seeds)
