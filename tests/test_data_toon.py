"""toon_storyboards: the procedural world, its renderer, the TFDS builder, text and toy latents."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tttjax.data import text_encoder, toon_render, toon_world, toy_latents
from tttjax.data.toon_storyboards import ToonStoryboards, ToonStoryboardsConfig, make_example

tfds.disable_progress_bar()

SMALL = ToonStoryboardsConfig(name="test_small", height=64, width=96, frames_per_segment=8,
                              min_segments=1, max_segments=4, num_train=10, num_validation=3,
                              seed=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def builder(data_dir):
    b = ToonStoryboards(config=SMALL, data_dir=data_dir, file_format="array_record")
    b.download_and_prepare()
    return b


# ------------------------------------------------------------------------------ world


def test_episodes_are_deterministic_and_distinct():
    a = toon_world.make_episode(3, 7, num_segments=3, frames_per_segment=4)
    b = toon_world.make_episode(3, 7, num_segments=3, frames_per_segment=4)
    c = toon_world.make_episode(3, 8, num_segments=3, frames_per_segment=4)
    assert a == b
    assert a != c
    assert len(a.states()) == 1 + 3 * 4


def test_actions_follow_the_grammar_and_captions_the_format():
    seen = set()
    for index in range(60):
        ep = toon_world.make_episode(0, index, num_segments=4, frames_per_segment=4)
        before = ep.first
        for seg in ep.segments:
            if not seg.scene_start:  # a new scene re-places everyone before its action
                assert seg.action in toon_world.applicable_actions(before), (index, seg.action)
            sentences = [s for s in seg.caption.split(". ") if s]
            assert 3 <= len(sentences) <= 5, seg.caption
            assert seg.caption.startswith("The "), seg.caption
            assert seg.frames[-1].room.kind in seg.caption
            seen.add(seg.action)
            before = dataclasses.replace(seg.frames[-1], cat_jump=0.0, mouse_jump=0.0)
        assert ep.scene_start[0] and ep.scene_end[-1]
        # a scene ends exactly where the next one starts
        np.testing.assert_array_equal(ep.scene_end[:-1], ep.scene_start[1:])
    assert seen == set(toon_world.ACTIONS), set(toon_world.ACTIONS) - seen


def test_hidden_mouse_is_invisible_and_hiding_changes_state():
    for index in range(80):
        ep = toon_world.make_episode(1, index, num_segments=3, frames_per_segment=4)
        for seg in ep.segments:
            if seg.action == "mouse_hides":
                assert seg.frames[0].mouse_visible and not seg.frames[-1].mouse_visible
            if seg.action == "mouse_peeks_out":
                assert seg.frames[-1].mouse_visible
            if seg.action == "mouse_eats_cheese":
                assert seg.frames[-1].cheese < seg.frames[0].cheese


def test_positions_are_where_the_characters_are_drawn():
    """Ground truth check: the stored cat centre is painted in the cat's colour."""
    h, w = 120, 180
    checked = 0
    for index in range(30):
        ep = toon_world.make_episode(2, index, num_segments=2, frames_per_segment=4)
        for state in ep.states():
            (cx, cy), (mx, my) = state.positions()
            if state.cat_asleep or (state.mouse_visible and abs(mx - cx) < 0.2):
                continue  # curled up / possibly covered by the mouse
            frame = toon_render.render_state(state, h, w)
            pixel = frame[int(cy * h), int(cx * w)]
            np.testing.assert_array_equal(pixel, toon_world.CAT_COLORS[state.cat_color])
            checked += 1
            if state.mouse_visible and abs(mx - cx) > 0.3:
                pixel = frame[int(my * h), int(mx * w)]
                np.testing.assert_array_equal(pixel, toon_world.MOUSE_COLORS[state.mouse_color])
    assert checked > 50


# ------------------------------------------------------------------------------ TFDS builder


def test_builder_writes_array_records_matching_the_world(builder):
    info = builder.info
    assert info.splits["train"].num_examples == 10 and info.splits["validation"].num_examples == 3
    counts = info.metadata["segment_counts"]
    source = builder.as_data_source(split="train")
    assert len(source) == 10
    for i in (0, 4, 9):
        ex = source[i]
        n, f = int(ex["num_segments"]), SMALL.frames_per_segment
        assert n == counts["train"][i] and int(ex["episode"]) == i
        assert ex["video"].shape == (1 + n * f, 64, 96, 3) and ex["video"].dtype == np.uint8
        assert ex["positions"].shape == (1 + n * f, 2, 2) and ex["visible"].shape == (1 + n * f, 2)
        assert len(ex["captions"]) == n and ex["scene_start"].shape == (n,)
        want = make_example(SMALL, i)
        np.testing.assert_array_equal(ex["video"], want["video"])
        np.testing.assert_array_equal(ex["positions"], want["positions"])
        assert [c.decode() for c in ex["captions"]] == want["captions"]
    # validation episodes continue the index range: disjoint from training
    assert int(builder.as_data_source(split="validation")[0]["episode"]) == 10


def test_named_data_source_finds_the_registered_builder(builder, data_dir):
    source = tfds.data_source("toon_storyboards", split="train", data_dir=data_dir,
                              builder_kwargs=dict(config=SMALL), download=False)
    assert len(source) == 10


def test_builder_config_validation():
    with pytest.raises(ValueError, match="min_segments"):
        ToonStoryboardsConfig(name="bad", min_segments=3, max_segments=2).validate()


# ------------------------------------------------------------------------------ text


def test_hashed_text_encoder():
    enc = text_encoder.HashedTextEncoder(64, seed=1)
    out = enc.encode(["The cat jumps.", "<start_scene> The cat jumps. <end_scene>", ""], 8)
    assert out.shape == (3, 8, 64) and out.dtype == np.float32
    assert text_encoder.tokenize("<start_scene> The cat, jumps!") == [
        "<start_scene>", "the", "cat", ",", "jumps", "!"]
    # same word, same position -> same vector; padding rows are zero; empty prompt is zero
    np.testing.assert_array_equal(out[0, :3], enc.encode(["the cat jumps"], 3)[0])
    assert not out[0, 4:].any() and not out[2].any()
    # positions are added: a word shifted by one position changes by the position code only
    pos = text_encoder.sinusoidal_positions(8, 64)
    np.testing.assert_allclose(out[1, 1] - out[0, 0], text_encoder.POS_SCALE * (pos[1] - pos[0]),
                               atol=1e-6)
    # truncation keeps the first tokens; another seed gives other vectors
    np.testing.assert_array_equal(enc.encode(["a b c d"], 2)[0], enc.encode(["a b"], 2)[0])
    assert not np.allclose(text_encoder.HashedTextEncoder(64, seed=2).encode(["cat"], 1), out[0, :1])
    words = np.stack([enc.encode([w], 1)[0, 0] for w in ("cat", "mouse", "cheese", "hole")])
    words -= text_encoder.POS_SCALE * pos[0]
    cos = words @ words.T / np.outer(np.linalg.norm(words, axis=1), np.linalg.norm(words, axis=1))
    assert np.abs(cos - np.eye(4)).max() < 0.5
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode("a cat", 4)


# ------------------------------------------------------------------------------ toy latents


def test_toy_latents_exact_pseudo_inverse():
    codec = toy_latents.ToyLatentCodec(6, seed=3)
    frames = make_example(SMALL, 2)["video"]
    z = codec.encode(frames)
    t = codec.latent_frames(len(frames))
    assert z.shape == (t, 6, 8, 12) and z.dtype == np.float32
    # decode(encode(x)) == x averaged over 4 x 8 x 8 blocks (float64 reference)
    x = frames.astype(np.float64) / 127.5 - 1.0
    groups = [x[:1]] + [x[1 + 4 * j: 5 + 4 * j] for j in range(t - 1)]
    pooled = np.stack([g.mean(axis=0) for g in groups]).reshape(t, 8, 8, 12, 8, 3).mean(axis=(2, 4))
    want = np.repeat(np.repeat(pooled, 8, axis=1), 8, axis=2)
    want = np.concatenate([want[:1], np.repeat(want[1:], 4, axis=0)])
    np.testing.assert_allclose(codec.decode_float(z), want, atol=1e-5)
    # encode(decode(z')) projects z' onto the colour subspace (and is exact on it)
    rng = np.random.default_rng(0)
    z2 = rng.standard_normal(z.shape).astype(np.float32)
    proj = np.einsum("cd,tdhw->tchw", codec.basis @ codec.basis.T, z2)
    np.testing.assert_allclose(codec.encode(codec.decode_float(z2)), proj, atol=1e-4)
    np.testing.assert_allclose(codec.encode(codec.decode_float(z)), z, atol=1e-4)
    # uint8 round trip: within half a grey level of the pooled video
    assert np.abs(codec.decode(z).astype(np.float64) / 127.5 - 1 - np.clip(want, -1, 1)).max() < 0.005
    # roughly standardised on toon videos
    assert abs(float(z.mean())) < 0.6 and 0.3 < float(z.std()) < 2.0
    with pytest.raises(ValueError, match="channels"):
        toy_latents.ToyLatentCodec(2)
    with pytest.raises(ValueError, match="1 \\+ 4 k frames"):
        codec.encode(frames[:-1])
