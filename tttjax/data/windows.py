"""Fixed-length training clips: every window of `n` consecutive segments of every record.

A stage trains on clips of exactly `n` 3-second segments (docs/design.md §5), but a dataset
holds videos of any length. `SegmentWindows` is a Grain random-access source over all
(record, first segment) pairs with `first + n <= record segments`, built from the per-record
segment counts the dataset stores in its metadata (no record is read to build it).

A window starting at segment `s` keeps the frame just before segment `s` as its first
frame (the prefix frame; frame 0 of the video when `s = 0`), so it has exactly the layout of
a video of `n` segments. Its first segment always opens a scene and its last always closes
one (`scene_start[0] = scene_end[-1] = True`): a clip is a whole storyboard to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# (record, first segment, n) -> window example
CropFn = Callable[[dict, int, int], dict]


class SegmentWindows:
    """Random-access source of n-segment windows (implements len and getitem for Grain)."""

    def __init__(self, source, segment_counts: Sequence[int], num_segments: int, crop: CropFn,
                 *, name: str = ""):
        if len(segment_counts) != len(source):
            raise ValueError(f"segment_counts has {len(segment_counts)} entries but the source has "
                             f"{len(source)} records; the dataset metadata is stale, regenerate it")
        counts = np.asarray(segment_counts, np.int64)
        starts = [(r, s) for r, c in enumerate(counts) for s in range(int(c) - num_segments + 1)]
        if not starts:
            raise ValueError(f"no record of {name or 'the dataset'} has {num_segments} segments "
                             f"(longest: {int(counts.max()) if len(counts) else 0}); lower "
                             "the stage's num_segments or use a dataset with longer videos")
        self._windows = np.asarray(starts, np.int64)
        self._source, self._crop, self.num_segments, self._name = source, crop, num_segments, name

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: int) -> dict:
        record, start = (int(v) for v in self._windows[index])
        return self._crop(self._source[record], start, self.num_segments)

    def __repr__(self) -> str:
        # Stable across processes and runs: Grain compares it when restoring iterator state.
        return f"SegmentWindows({self._name}, n={self.num_segments}, windows={len(self)})"


def _window_common(example: dict, start: int, n: int) -> dict:
    scene_start = np.asarray(example["scene_start"][start:start + n], bool).copy()
    scene_end = np.asarray(example["scene_end"][start:start + n], bool).copy()
    scene_start[0] = scene_end[-1] = True
    return {"captions": list(example["captions"][start:start + n]),
            "scene_start": scene_start, "scene_end": scene_end}


def crop_toon(frames_per_segment: int) -> CropFn:
    """Window crop for `toon_storyboards` records (video frames, positions, visibility)."""
    f = frames_per_segment

    def crop(example: dict, start: int, n: int) -> dict:
        lo, hi = start * f, start * f + 1 + n * f
        out = _window_common(example, start, n)
        out.update(video=example["video"][lo:hi], positions=example["positions"][lo:hi],
                   visible=example["visible"][lo:hi],
                   actions=list(example["actions"][start:start + n]))
        return out
    return crop


def crop_latents(frames_per_segment: int, prefix_frames: int) -> CropFn:
    """Window crop for `latents` records (latent frames and per-segment text embeddings)."""
    f, p = frames_per_segment, prefix_frames

    def crop(example: dict, start: int, n: int) -> dict:
        lo, hi = start * f, start * f + p + n * f
        out = _window_common(example, start, n)
        out.update(latents_mean=example["latents_mean"][lo:hi],
                   latents_logvar=example["latents_logvar"][lo:hi],
                   text=example["text"][start:start + n])
        return out
    return crop
