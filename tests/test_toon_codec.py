"""The learned toon codec (`tttjax.data.toon_codec`): shipped weights, geometry, quality."""

import numpy as np
import pytest

from tttjax.data import toon_codec, toon_render, toon_world, toy_latents


@pytest.fixture(scope="module")
def codec():
    return toon_codec.load_codec()


def _episode(index, h=64, w=64):
    ep = toon_world.make_episode(0, index, num_segments=2, frames_per_segment=8)
    return ep, toon_render.render_episode(ep, h, w)


def test_shipped_weights_are_small_and_load(codec):
    import os

    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(toon_codec.DEFAULT_WEIGHTS) for f in files)
    assert size < 400_000
    assert codec.channels == 4 and (codec.temporal, codec.spatial) == (4, 8)
    assert toy_latents.make_toon_codec("learned", 4) is codec or \
        toy_latents.make_toon_codec("learned", 4).channels == 4


def test_geometry_and_standardised_latents(codec):
    _, frames = _episode(0)                                        # 17 frames
    z = codec.encode(frames)
    assert z.shape == (5, 4, 8, 8) and z.dtype == np.float32
    assert abs(float(z.mean())) < 0.6 and 0.4 < float(z.std()) < 1.6
    out = codec.decode(z)
    assert out.shape == frames.shape and out.dtype == np.uint8
    # the small geometry (128 x 192) goes through the same network
    _, big = _episode(1, 128, 192)
    assert codec.encode(big).shape == (5, 4, 16, 24)


def test_learned_codec_draws_the_characters_better_than_the_linear_map(codec):
    """Error on the pixels where the cat, mouse or cheese are drawn (the empty room differs)."""
    linear = toy_latents.ToyLatentCodec(4)
    errs = {"learned": [], "linear": []}
    for index in range(3):
        ep, frames = _episode(index)
        back = np.stack([np.asarray(toon_render._background(s.room, 64, 64))
                         for s in ep.states()])
        mask = np.any(frames != back, axis=-1)
        for name, c in (("learned", codec), ("linear", linear)):
            diff = np.abs(c.decode(c.encode(frames)).astype(np.float32) - frames)
            errs[name].append(diff.mean(-1)[mask].mean())
    assert np.mean(errs["learned"]) < 0.75 * np.mean(errs["linear"]), errs  # measured 0.62


def test_bad_inputs_name_the_problem(codec):
    with pytest.raises(ValueError, match="1 \\+ 4 k frames"):
        codec.encode(np.zeros((6, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple of 8"):
        codec.encode(np.zeros((5, 60, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="toon_codec"):
        toy_latents.make_toon_codec("vae", 4)
    with pytest.raises(ValueError, match="channels"):
        toon_codec.codec_for_channels(16)
