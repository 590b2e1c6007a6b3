"""`python -m tttjax.eval.validate`: does the storyboard score separate right from wrong?

    python -m tttjax.eval.validate [--count 16] [--segments 4] [--seed 0] [--config tiny]
        [--codec linear|learned|none]

Renders `count` ground-truth episodes of the toon world `seed` (`tttjax.data.toon_export`),
optionally passes them through a toon latent codec (encode + decode, what a generated video
goes through), and scores four versions of each with `tttjax.eval.score`:

    real        the episode with its own storyboard
    reordered   its segments played in reverse order, with the storyboard unchanged
    mismatched  the episode with the storyboard of the next episode
    spliced     the first half of the episode, then the second half of the next episode,
                with their storyboards joined and no scene change asked at the splice

and prints one JSON line of mean `following` and `consistency` per version.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from tttjax.command_line import ArgumentParser

VERSIONS = ("real", "reordered", "mismatched", "spliced")


def _segments(frames: np.ndarray, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    f = (len(frames) - 1) // n
    return frames[0], [frames[1 + s * f:1 + (s + 1) * f] for s in range(n)]


def versions(frames_a, board_a, frames_b, board_b) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """The four versions (module doc) of episode a, b being the next episode: {name: (frames,
    storyboard)}. Both episodes have the same number of segments n >= 2."""
    n = len(board_a)
    first, segs = _segments(frames_a, n)
    first_b, segs_b = _segments(frames_b, n)
    reordered = np.concatenate([first[None]] + segs[::-1])
    half = n // 2
    spliced = np.concatenate([first[None]] + segs[:half] + segs_b[half:])
    board_spliced = [dict(s) for s in board_a[:half]] + [dict(s) for s in board_b[half:]]
    board_spliced[half]["requires_scene_transition"] = False
    return {"real": (frames_a, board_a), "reordered": (reordered, board_a),
            "mismatched": (frames_a, board_b), "spliced": (spliced, board_spliced)}


def separation(count: int, segments: int, seed: int = 0, config: str = "tiny",
               codec=None, detector=None) -> dict:
    """Mean scores of each version over `count` episodes (module doc); also per-episode lists."""
    from tttjax.data.toon_export import make_episode
    from tttjax.eval.detector import load_detector
    from tttjax.eval.score import score_detections

    if count < 2 or segments < 2:
        raise ValueError("need --count >= 2 and --segments >= 2")
    det = detector or load_detector()
    eps = []
    for i in range(count):
        _, frames, board = make_episode(seed, i, segments, config)
        if codec is not None:
            frames = codec.decode(codec.encode(frames))
        eps.append((frames, board))
    scores = {v: {"following": [], "consistency": []} for v in VERSIONS}
    for i in range(count):
        (fa, ba), (fb, bb) = eps[i], eps[(i + 1) % count]
        for name, (frames, board) in versions(fa, ba, fb, bb).items():
            result = score_detections(det.detect(frames), board)
            for k in ("following", "consistency"):
                scores[name][k].append(result[k])
    return {name: {k: round(float(np.mean(v)), 4) for k, v in s.items()} |
            {f"{k}_all": v for k, v in s.items()} for name, s in scores.items()}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tttjax.eval.validate",
                            description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--codec", default="none", choices=("none", "linear", "learned"),
                        help="pass the episodes through this toon codec first (tiny only)")
    args = parser.parse_args(argv)
    if args.count < 2 or args.segments < 2:
        parser.error("--count and --segments must be >= 2")
    codec = None
    if args.codec != "none":
        from tttjax.data.toy_latents import make_toon_codec

        codec = make_toon_codec(args.codec, 4)
    result = separation(args.count, args.segments, args.seed, args.config, codec)
    print(json.dumps({k: {m: v[m] for m in ("following", "consistency")}
                      for k, v in result.items()} | vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
