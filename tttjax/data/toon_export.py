"""`python -m tttjax.data.toon_export`: ground-truth toon episodes as MP4 + storyboard JSON.

    python -m tttjax.data.toon_export --out DIR --count N --segments S --seed K [--config tiny|small]

writes, for episode i = 0 .. N-1 of the toon world `K` (`tttjax.data.toon_world`, drawn by
`tttjax.data.toon_render` at the geometry of the `toon_storyboards` config):

    DIR/toon_K_<i>.mp4    uint8 frames 1 + S * F (F = frames per 3-second segment: 8 for tiny,
                          16 for small), H.264 at F / 3 frames per second
    DIR/toon_K_<i>.json   the storyboard (`tttjax.storyboard` sampling format): one entry per
                          segment, {"text": caption, "requires_scene_transition": bool}

This is the input format of `python -m tttjax.precompute --videos DIR` and of
`python -m tttjax.eval --video DIR/toon_K_<i>.mp4 --storyboard DIR/toon_K_<i>.json`.
Episodes are pure functions of (seed, index), so any episode can be regenerated.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from tttjax.command_line import ArgumentParser, one_line_errors
from tttjax.data import toon_render, toon_world

_PROG = "python -m tttjax.data.toon_export"
GEOMETRIES = {"tiny": (64, 64, 8), "small": (128, 192, 16)}   # height, width, frames/segment


def episode_id(seed: int, index: int) -> str:
    return f"toon_{seed}_{index:05d}"


def storyboard_of(episode: toon_world.Episode) -> list[dict]:
    """The episode's storyboard: one {"text", "requires_scene_transition"} per segment."""
    return [{"text": s.caption, "requires_scene_transition": bool(s.scene_start and i > 0)}
            for i, s in enumerate(episode.segments)]


def make_episode(seed: int, index: int, segments: int, config: str = "tiny"
                 ) -> tuple[toon_world.Episode, np.ndarray, list[dict]]:
    """(episode, frames uint8 [1 + S F, H, W, 3], storyboard) of episode `index` of world `seed`."""
    if config not in GEOMETRIES:
        raise ValueError(f"unknown config {config!r}; choose one of {sorted(GEOMETRIES)}")
    h, w, f = GEOMETRIES[config]
    episode = toon_world.make_episode(seed, index, num_segments=segments, frames_per_segment=f)
    return episode, toon_render.render_episode(episode, h, w), storyboard_of(episode)


def export(out: str, count: int, segments: int, seed: int, config: str = "tiny") -> list[str]:
    """Writes `count` episodes into `out`; returns their ids."""
    from tttjax.video_io import write_mp4

    os.makedirs(out, exist_ok=True)
    fps = GEOMETRIES[config][2] / 3.0
    ids = []
    for index in range(count):
        _, frames, board = make_episode(seed, index, segments, config)
        vid = episode_id(seed, index)
        write_mp4(frames, os.path.join(out, vid + ".mp4"), fps=fps, quality=10)
        with open(os.path.join(out, vid + ".json"), "w", encoding="utf-8") as fh:
            json.dump(board, fh, indent=1)
        ids.append(vid)
    return ids


@one_line_errors(_PROG)
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of episodes")
    parser.add_argument("--segments", type=int, required=True, help="3-second segments each")
    parser.add_argument("--seed", type=int, default=0, help="toon world seed (default 0)")
    parser.add_argument("--config", default="tiny", choices=sorted(GEOMETRIES),
                        help="geometry: tiny (64x64, 8 frames/segment) or small (128x192, 16)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.segments < 1:
        parser.error("--count and --segments must be >= 1")
    ids = export(args.out, args.count, args.segments, args.seed, args.config)
    print(f"wrote {len(ids)} episodes ({args.segments} segments, {args.config}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
