"""`toon_storyboards`: a TFDS dataset of procedural cartoon episodes, generated locally.

    import tensorflow_datasets as tfds
    import tttjax.data.toon_storyboards  # registers the builder
    source = tfds.data_source("toon_storyboards/tiny", split="train", data_dir=DIR)
    example = source[0]

No download and no TensorFlow: the episodes come from `tttjax.data.toon_world` (drawn by
`tttjax.data.toon_render`) and are written as ArrayRecord files, read with
`tfds.data_source` (random access, for Grain). The first use of a config generates it
(a few seconds for `tiny`).

One example = one episode of `num_segments` 3-second segments, F frames per segment:

    video          uint8 [1 + n F, H, W, 3]  frame 0, then F frames per segment (zlib-compressed)
    captions       n strings                 3-5 sentences per segment, the action first
    actions        n strings                 the segment's action (toon_world.ACTIONS)
    rooms          n strings                 the room each segment plays in
    scene_start    bool [n]                  the segment opens a scene (`<start_scene>`)
    scene_end      bool [n]                  the segment closes a scene (`<end_scene>`)
    positions      float32 [1 + n F, 2, 2]   (x, y) body centres of (cat, mouse), in [0, 1]
    visible        bool [1 + n F, 2]         is the character visible (the mouse hides)
    num_segments   int32
    episode        int64                     episode index in the world of `seed`

Records are stored in episode order (no shuffling at generation time) and
`info.metadata["segment_counts"][split]` lists each record's `num_segments`, so a loader can
cut fixed-length windows without reading the videos.

Configs (frame rate = frames_per_segment / 3 s):

    tiny      64 x 64,   8 frames/segment (2.7 fps), 1-3 segments, 2048 train / 128 validation
    small     128 x 192, 16 frames/segment (5.3 fps), 1-6 segments, 1024 / 64
    480p      480 x 720, 48 frames/segment (16 fps, CogVideoX's), 1-3 segments, 64 / 8

Other geometries: pass `config=ToonStoryboardsConfig(name=..., ...)` to the builder.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tttjax.data import toon_render, toon_world


@dataclasses.dataclass
class ToonStoryboardsConfig(tfds.core.BuilderConfig):
    height: int = 64
    width: int = 64
    frames_per_segment: int = 8
    min_segments: int = 1
    max_segments: int = 3
    num_train: int = 2048
    num_validation: int = 128
    seed: int = 0
    scene_change_prob: float = 0.3

    def validate(self) -> None:
        problems = []
        if self.height < 8 or self.width < 8:
            problems.append(f"height/width must be >= 8, got {self.height}x{self.width}")
        if self.frames_per_segment < 1:
            problems.append(f"frames_per_segment must be >= 1, got {self.frames_per_segment}")
        if not 1 <= self.min_segments <= self.max_segments:
            problems.append(f"need 1 <= min_segments <= max_segments, got "
                            f"{self.min_segments}, {self.max_segments}")
        if self.num_train < 1 or self.num_validation < 0:
            problems.append("num_train must be >= 1 and num_validation >= 0")
        if not 0.0 <= self.scene_change_prob <= 1.0:
            problems.append(f"scene_change_prob must be in [0, 1], got {self.scene_change_prob}")
        if problems:
            raise ValueError(f"toon_storyboards config {self.name!r}: " + "; ".join(problems))


class ToonStoryboards(tfds.core.GeneratorBasedBuilder):
    """Procedural cat-and-mouse cartoons with per-segment captions and ground-truth positions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ToonStoryboardsConfig(name="tiny", description="64x64, 8 frames per 3 s segment"),
        ToonStoryboardsConfig(name="small", description="128x192, 16 frames per 3 s segment",
                              height=128, width=192, frames_per_segment=16, max_segments=6,
                              num_train=1024, num_validation=64),
        ToonStoryboardsConfig(name="480p", description="480x720 at 16 fps (CogVideoX geometry)",
                              height=480, width=720, frames_per_segment=48, max_segments=3,
                              num_train=64, num_validation=8),
    ]
    DEFAULT_CONFIG_NAME = "tiny"

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        cfg.validate()
        h, w = cfg.height, cfg.width
        return self.dataset_info_from_configs(
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(None, h, w, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.ZLIB),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "actions": tfds.features.Sequence(tfds.features.Text()),
                "rooms": tfds.features.Sequence(tfds.features.Text()),
                "scene_start": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "scene_end": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "positions": tfds.features.Tensor(shape=(None, 2, 2), dtype=np.float32),
                "visible": tfds.features.Tensor(shape=(None, 2), dtype=np.bool_),
                "num_segments": tfds.features.Scalar(dtype=np.int32),
                "episode": tfds.features.Scalar(dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_ranges(self) -> dict[str, range]:
        cfg = self.builder_config
        ranges = {"train": range(0, cfg.num_train)}
        if cfg.num_validation:
            ranges["validation"] = range(cfg.num_train, cfg.num_train + cfg.num_validation)
        return ranges

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        ranges = self._split_ranges()
        self.info.metadata["segment_counts"] = {
            split: [toon_world.episode_segments(cfg.seed, i, cfg.min_segments, cfg.max_segments)
                    for i in r] for split, r in ranges.items()}
        self.info.metadata["frames_per_segment"] = cfg.frames_per_segment
        return {split: self._generate_examples(r) for split, r in ranges.items()}

    def _generate_examples(self, indices: range):
        for index in indices:
            yield index, make_example(self.builder_config, index)


def make_example(cfg: ToonStoryboardsConfig, index: int) -> dict:
    """The dataset record of episode `index` (also usable without TFDS)."""
    n = toon_world.episode_segments(cfg.seed, index, cfg.min_segments, cfg.max_segments)
    episode = toon_world.make_episode(cfg.seed, index, num_segments=n,
                                      frames_per_segment=cfg.frames_per_segment,
                                      scene_change_prob=cfg.scene_change_prob)
    states = episode.states()
    return {
        "video": toon_render.render_episode(episode, cfg.height, cfg.width),
        "captions": [s.caption for s in episode.segments],
        "actions": [s.action for s in episode.segments],
        "rooms": [s.frames[-1].room.kind for s in episode.segments],
        "scene_start": episode.scene_start,
        "scene_end": episode.scene_end,
        "positions": np.stack([s.positions() for s in states]),
        "visible": np.stack([s.visible() for s in states]),
        "num_segments": np.int32(n),
        "episode": np.int64(index),
    }
