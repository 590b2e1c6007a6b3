"""Storyboard JSON: validation messages, scene markers, frame counts, embeddings."""

import json

import numpy as np
import pytest

from tttjax.data.text_encoder import HashedTextEncoder
from tttjax.storyboard import (
    Storyboard,
    StoryboardError,
    embed_storyboard,
    load_storyboard,
    num_latent_frames,
    num_video_frames,
    parse_storyboard,
)

THREE = [
    {"text": "Tom sleeps in the armchair.", "neg_text": "blurry",
     "requires_scene_transition": True},
    {"text": "Jerry steals the cheese."},
    {"text": "At the beach, Tom surfs.", "neg_text": None, "requires_scene_transition": True},
]


def _write(tmp_path, obj, name="board.json", raw=False):
    path = tmp_path / name
    path.write_text(obj if raw else json.dumps(obj), encoding="utf-8")
    return str(path)


def test_load_list_and_object_forms(tmp_path):
    a = load_storyboard(_write(tmp_path, THREE))
    b = load_storyboard(_write(tmp_path, {"segments": THREE}, "b.json"))
    assert a == b and isinstance(a, Storyboard) and a.num_segments == 3
    assert a.negative_prompts == ["blurry", "", ""]
    assert a.captions[1] == "Jerry steals the cheese."
    # The flag on segment 0 is ignored; segment 2 opens a scene, so segment 1 closes one.
    np.testing.assert_array_equal(a.scene_flags, [False, False, True])
    assert a.prompts == ["Tom sleeps in the armchair.",
                         "Jerry steals the cheese. <end_scene>",
                         "<start_scene> At the beach, Tom surfs."]


def test_frame_counts_follow_cogvideox():
    # docs/design.md §3: 13 / 37 / 73 / 121 / 253 latent frames for 3 / 9 / 18 / 30 / 63 s.
    assert [num_latent_frames(n) for n in (1, 3, 6, 10, 21)] == [13, 37, 73, 121, 253]
    assert num_video_frames(1) == 49 and num_video_frames(21) == 48 * 21 + 1
    assert num_latent_frames(3, frames_per_segment=2) == 7  # the tiny config
    assert num_video_frames(3, frames_per_segment=2) == 25
    with pytest.raises(ValueError, match="segment"):
        num_latent_frames(0)


@pytest.mark.parametrize("data,match", [
    ([], "empty"),
    ({"segments": []}, "empty"),
    ({"scenes": THREE}, "'segments'"),
    ("a caption", "expected a list of segments .* got a string"),
    (42, "got a number"),
    ([THREE, THREE], "2 storyboards"),
    ([{"text": "ok"}, "just text"], "segment 1: expected an object"),
    ([{"text": "ok"}, {"neg_text": "x"}], "segment 1: missing field 'text'"),
    ([{"text": 3}], "segment 0: field 'text' must be a string, got a number"),
    ([{"text": "  "}], "segment 0: field 'text' is empty"),
    ([{"text": "a", "neg_text": ["x"]}], "segment 0: field 'neg_text' must be a string, got a list"),
    ([{"text": "a"}, {"text": "b", "requires_scene_transition": "yes"}],
     "segment 1: field 'requires_scene_transition' must be true or false, got a string"),
    ([{"text": "a", "requires_scene_transition": 1}], "must be true or false, got a number"),
    ([{"text": "a", "neg_txt": "x"}], "segment 0: unknown field 'neg_txt'"),
])
def test_bad_storyboards_give_one_line_errors(tmp_path, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(StoryboardError, match=match) as err:
        load_storyboard(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(path)
    assert isinstance(err.value, ValueError)


def test_unreadable_files(tmp_path):
    with pytest.raises(StoryboardError, match="not found"):
        load_storyboard(str(tmp_path / "missing.json"))
    with pytest.raises(StoryboardError, match=r"not valid JSON \(line 1, column"):
        load_storyboard(_write(tmp_path, '[{"text": "a",]', raw=True))


class _CountingEncoder:
    def __init__(self):
        self.inner, self.calls = HashedTextEncoder(dim=16), []

    def encode(self, texts, max_length):
        self.calls.append(list(texts))
        return self.inner.encode(texts, max_length=max_length)


def test_embed_storyboard():
    board = parse_storyboard(THREE)
    enc = _CountingEncoder()
    cond, uncond, flags = embed_storyboard(board, enc, max_length=12)
    assert cond.shape == uncond.shape == (3, 12, 16) and cond.dtype == np.float32
    np.testing.assert_array_equal(flags, [False, False, True])
    assert enc.calls == [board.prompts + board.negative_prompts]  # one batched call
    np.testing.assert_array_equal(cond, enc.inner.encode(board.prompts, max_length=12))
    np.testing.assert_array_equal(uncond, enc.inner.encode(["blurry", "", ""], max_length=12))
    assert not np.array_equal(cond[2], enc.inner.encode([THREE[2]["text"]], max_length=12)[0])
