"""`python -m tttjax.eval`: score toon videos against their storyboards (`tttjax.eval.score`).

    python -m tttjax.eval --video V.mp4 --storyboard S.json [--verbose]
        one JSON line: {"video", "following", "consistency"[, "segments",
        "consistency_detail"]}
    python -m tttjax.eval --workdir W --storyboards DIR [--csv OUT.csv] [--seed 0] [--steps 50]
        samples every DIR/*.json storyboard with the trained run W (`tttjax.generation`),
        scores each video, writes one CSV row per storyboard (default W/eval.csv) and prints
        one JSON line with the means

Scores are in [0, 1]: `following` (each segment shows what its text says: the action, the
room, the colours, a scene change exactly where asked) and `consistency` (the characters
keep their colours, each scene its room, the motion is continuous across segment
boundaries). The detector behind them was trained on the toon renderer's ground truth only.
Bad input exits with code 2 and one line; a failure while running exits with code 1.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

import numpy as np

from tttjax.command_line import ArgumentParser, UsageError, fail

_PROG = "python -m tttjax.eval"


def read_frames(path: str) -> np.ndarray:
    """Every frame of a video file: uint8 [F, H, W, 3]."""
    import imageio_ffmpeg

    if not os.path.isfile(path):
        raise UsageError(f"video {path!r} not found")
    reader = imageio_ffmpeg.read_frames(path)
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in reader]
    except (OSError, RuntimeError, StopIteration) as err:
        raise UsageError(f"{path}: not a readable video ({' '.join(str(err).split())[:200]})"
                         ) from None
    finally:
        reader.close()
    if not frames:
        raise UsageError(f"{path}: no frames")
    return np.stack(frames)


def read_storyboard(path: str) -> list[dict]:
    """The storyboard file as a list of {"text", "requires_scene_transition"} (validated)."""
    from tttjax.storyboard import StoryboardError, load_storyboard

    try:
        board = load_storyboard(path)
    except (StoryboardError, OSError) as err:
        raise UsageError(str(err)) from None
    return [{"text": s.text, "requires_scene_transition": s.requires_scene_transition}
            for s in board.segments]


def _score_one(video: str, storyboard: str, verbose: bool) -> dict:
    from tttjax.eval.score import score_video

    frames, board = read_frames(video), read_storyboard(storyboard)
    n = len(board)
    if (len(frames) - 1) % n:
        raise UsageError(f"{video} has {len(frames)} frames; a {n}-segment storyboard needs "
                         f"1 + {n} x F (frame 0, then F frames per segment)")
    result = score_video(frames, board)
    out = {"video": video, "following": result["following"],
           "consistency": result["consistency"]}
    if verbose:
        out.update(segments=result["segments"], consistency_detail=result["consistency_detail"])
    return out


def _score_run(workdir: str, folder: str, csv_path: str, seed: int, steps: int) -> dict:
    from tttjax.eval.score import score_video
    from tttjax.generation import generate, load_generator
    from tttjax.storyboard import load_storyboard

    paths = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not paths:
        raise UsageError(f"no storyboards (*.json) in {folder!r}")
    boards = {p: read_storyboard(p) for p in paths}
    try:
        gen = load_generator(workdir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    rows = []
    for path in paths:
        video = generate(gen, load_storyboard(path), seed=seed, steps=steps)
        result = score_video(video.frames, boards[path])
        rows.append({"storyboard": os.path.basename(path), "segments": len(boards[path]),
                     "following": result["following"], "consistency": result["consistency"],
                     **{f"consistency_{k}": v for k, v in result["consistency_detail"].items()}})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"workdir": workdir, "storyboards": len(rows), "csv": csv_path,
            "following": round(float(np.mean([r["following"] for r in rows])), 4),
            "consistency": round(float(np.mean([r["consistency"] for r in rows])), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="a toon video (MP4, ...) to score")
    parser.add_argument("--storyboard", help="its storyboard JSON")
    parser.add_argument("--verbose", action="store_true", help="per-segment detail")
    parser.add_argument("--workdir", help="a trained run to sample and score")
    parser.add_argument("--storyboards", help="folder of storyboard JSON files to sample")
    parser.add_argument("--csv", help="CSV of the --workdir scores (default WORKDIR/eval.csv)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    args = parser.parse_args(argv)
    single = args.video or args.storyboard
    run = args.workdir or args.storyboards
    if bool(single) == bool(run):
        parser.error("give either --video and --storyboard, or --workdir and --storyboards")
    if single and not (args.video and args.storyboard):
        parser.error("--video needs --storyboard (and the other way round)")
    if run and not (args.workdir and args.storyboards):
        parser.error("--workdir needs --storyboards (and the other way round)")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        if single:
            out = _score_one(args.video, args.storyboard, args.verbose)
        else:
            out = _score_run(args.workdir, args.storyboards,
                             args.csv or os.path.join(args.workdir, "eval.csv"), args.seed,
                             args.steps)
    except UsageError as err:
        return fail(_PROG, err)
    except (OSError, ValueError) as err:
        return fail(_PROG, err, code=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
