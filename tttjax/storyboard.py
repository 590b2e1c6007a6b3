"""Storyboards: the sampling input of docs/design.md §6, one entry per 3-second segment.

A storyboard file is JSON, either a list of segments or {"segments": [...]}:

    [
      {"text": "Tom chases Jerry across the kitchen. ...",
       "neg_text": "blurry, deformed limbs",            (optional, default "")
       "requires_scene_transition": false},            (optional, default false)
      {"text": "...", "requires_scene_transition": true}
    ]

`requires_scene_transition` on segment i > 0 starts a new scene there: segment i's prompt
gets `<start_scene>` and segment i-1's gets `<end_scene>` (the markers of the training
captions, `tttjax.data.text_encoder.segment_prompt`); on segment 0 it is ignored, as in the
public ttt-video-dit sampler. Negative prompts are used as written.

The number of segments sets the video length: n segments are `frames_per_segment * n +
prefix_frames` latent frames (12n + 1 for CogVideoX: 13 for 3 s, 253 for 63 s), decoded by
the 4x temporal VAE to `(T_latent - 1) * 4 + 1` = 48n + 1 frames at 16 fps.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Protocol

import numpy as np

from tttjax.data.text_encoder import segment_prompt
from tttjax.models.dit_config import num_latent_frames  # noqa: F401  (re-exported)

FIELDS = ("text", "neg_text", "requires_scene_transition")
SEGMENT_SECONDS = 3
FPS = 16


class StoryboardError(ValueError):
    """A storyboard that cannot be used; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Segment:
    text: str
    neg_text: str = ""
    requires_scene_transition: bool = False


@dataclasses.dataclass(frozen=True)
class Storyboard:
    segments: tuple[Segment, ...]

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def scene_flags(self) -> np.ndarray:
        """bool [n]: segment i opens a new scene (always False for segment 0)."""
        flags = np.array([s.requires_scene_transition for s in self.segments], bool)
        flags[0] = False
        return flags

    @property
    def prompts(self) -> list[str]:
        """Per-segment prompts with the scene markers inserted."""
        start = self.scene_flags
        end = np.append(start[1:], False)
        return [segment_prompt(s.text, bool(a), bool(b))
                for s, a, b in zip(self.segments, start, end)]

    @property
    def negative_prompts(self) -> list[str]:
        return [s.neg_text for s in self.segments]

    @property
    def captions(self) -> list[str]:
        return [s.text for s in self.segments]


def num_video_frames(num_segments: int, frames_per_segment: int = 12, prefix_frames: int = 1,
                     temporal_compression: int = 4) -> int:
    """Decoded frames of an n-segment video: (T_latent - 1) * 4 + 1 (48n + 1 for CogVideoX)."""
    latent = num_latent_frames(num_segments, frames_per_segment, prefix_frames)
    return (latent - 1) * temporal_compression + 1


def _type_name(value: Any) -> str:
    return {bool: "boolean", str: "string", int: "number", float: "number", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _check_encodable(text: str, where: str, field: str) -> None:
    """JSON allows lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise StoryboardError(f"{where}: field {field!r} holds an unpaired surrogate "
                              f"{text[err.start]!r} at character {err.start}; not valid "
                              "Unicode text") from None


def parse_storyboard(data: Any, source: str = "storyboard") -> Storyboard:
    """Validates decoded JSON; raises StoryboardError with a one-line message."""
    if isinstance(data, dict):
        if set(data) != {"segments"}:
            raise StoryboardError(f"{source}: an object storyboard must have exactly one key "
                                  f"'segments', got keys {sorted(data)}")
        data = data["segments"]
    if not isinstance(data, list):
        raise StoryboardError(f"{source}: expected a list of segments (or {{\"segments\": [...]}}), "
                              f"got a {_type_name(data)}")
    if not data:
        raise StoryboardError(f"{source}: the storyboard is empty; give at least one segment "
                              "{\"text\": ...}")
    if all(isinstance(item, list) for item in data):
        raise StoryboardError(f"{source}: this file holds {len(data)} storyboards (a list of "
                              "lists); put one storyboard (a list of segments) in the file")
    segments = []
    for i, item in enumerate(data):
        where = f"{source}: segment {i}"
        if not isinstance(item, dict):
            raise StoryboardError(f"{where}: expected an object with a 'text' field, got a "
                                  f"{_type_name(item)}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise StoryboardError(f"{where}: unknown field {unknown[0]!r} (allowed: "
                                  f"{', '.join(FIELDS)})")
        if "text" not in item:
            raise StoryboardError(f"{where}: missing field 'text' (the segment's caption)")
        text = item["text"]
        if not isinstance(text, str):
            raise StoryboardError(f"{where}: field 'text' must be a string, got a {_type_name(text)}")
        if not text.strip():
            raise StoryboardError(f"{where}: field 'text' is empty")
        _check_encodable(text, where, "text")
        neg = item.get("neg_text", "")
        if neg is None:
            neg = ""
        if not isinstance(neg, str):
            raise StoryboardError(f"{where}: field 'neg_text' must be a string, got a "
                                  f"{_type_name(neg)}")
        _check_encodable(neg, where, "neg_text")
        flag = item.get("requires_scene_transition", False)
        if not isinstance(flag, bool):
            raise StoryboardError(f"{where}: field 'requires_scene_transition' must be true or "
                                  f"false, got a {_type_name(flag)}")
        segments.append(Segment(text=text.strip(), neg_text=neg.strip(),
                                requires_scene_transition=flag))
    return Storyboard(tuple(segments))


def load_storyboard(path: str) -> Storyboard:
    """Reads and validates a storyboard JSON file (module docstring); StoryboardError if bad."""
    if not os.path.isfile(path):
        raise StoryboardError(f"storyboard file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise StoryboardError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg})") from None
    except UnicodeDecodeError:
        raise StoryboardError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise StoryboardError(f"{path}: JSON nested too deeply (a storyboard is a list of "
                              "segment objects)") from None
    return parse_storyboard(data, source=path)


class TextEncoder(Protocol):
    def encode(self, texts: list[str], max_length: int) -> np.ndarray: ...


def embed_storyboard(storyboard: Storyboard, text_encoder: TextEncoder, max_length: int = 226
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-segment prompt embeddings.

    Args:
      storyboard: a validated storyboard.
      text_encoder: anything with `encode(list[str], max_length) -> [B, S, D]`
        (`tttjax.text.T5TextEncoder`, `tttjax.data.text_encoder.HashedTextEncoder`).
      max_length: tokens per prompt (S).
    Returns:
      (cond [n, S, D] float32 with scene markers, uncond [n, S, D] float32 of the negative
      prompts, scene_flags bool [n]).
    """
    n = storyboard.num_segments
    emb = np.asarray(text_encoder.encode(storyboard.prompts + storyboard.negative_prompts,
                                         max_length=max_length), np.float32)
    if emb.ndim != 3 or emb.shape[:2] != (2 * n, max_length):
        raise ValueError(f"text encoder returned shape {emb.shape}, expected [{2 * n}, "
                         f"{max_length}, D]")
    return emb[:n], emb[n:], storyboard.scene_flags
