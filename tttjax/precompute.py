"""Pre-compute the `latents` dataset (docs/design.md §6) from videos and their storyboards.

    python -m tttjax.precompute --videos DIR --vae VAE_DIR \\
        (--text-encoder T5_DIR | --hashed-text-dim D [--hashed-text-seed S]) \\
        --manual-dir MANUAL --data-dir DATA [--split train] [--config-name cogvideox5b] \\
        [--height H] [--width W] [--fps 16] [--text-length 226] \\
        [--frames-per-segment 12] [--prefix-frames 1] [--tile-batches 4] \\
        [--shard-index I --shard-count N] [--build-only] [--skip-bad]

Input: `--videos DIR` holds `<id>.<ext>` videos (mp4, mov, webm, mkv, avi, gif: anything
ffmpeg reads) and one storyboard `<id>.json` per video (the sampling format of
`tttjax.storyboard`: one entry per 3-second segment). n segments take the first
`((prefix + n * frames_per_segment) - 1) * 4 + 1` frames (48n + 1 for CogVideoX, 3 s per
segment at 16 fps) of the video, resampled to `--fps`: output frame k is the source frame
shown at time k / fps (frames are dropped, or repeated for slower sources). Each frame is
scaled (bicubic) to cover `--height` x `--width` (default: the VAE's sample size) and
center-cropped, then mapped to [-1, 1] and encoded by the VAE (`tttjax.models.vae`, temporal
tiles of `--tile-batches` frame batches). Frames beyond the storyboard are unused.

Text: every segment's prompt (its caption with the `<start_scene>` / `<end_scene>` markers
the storyboard's `requires_scene_transition` flags imply, exactly as `python -m tttjax.sample`
prompts) is embedded by the T5 encoder of `--text-encoder` (a transformers folder with its
tokenizer, or a CogVideoX pipeline folder), or by the download-free hashed encoder
(`tttjax.data.text_encoder`, `--hashed-text-dim`), padded/cut to `--text-length` tokens.

Output layout:

    <manual-dir>/<split>/<id>.npz        `tttjax.data.latents.write_source_example`
    <data-dir>/latents/<name>/1.0.0/     the TFDS dataset (ArrayRecord)

`<name>` is `--config-name` (default cogvideox5b: 16 latent channels, T5-XXL 4096 x 226, 12
latent frames per segment after 1, scaling 0.7) when the VAE, text encoder and flags give
exactly its shapes, else `<config-name>_<hash>`, the name the training loader derives
(`tttjax.data.loader.latents_config`): the final line prints the `data.builder_config` /
`data.builder_overrides` a training config needs to read it. The dataset's `scaling_factor`
is the VAE's (config.json). Every split folder under `--manual-dir` goes into the dataset; a
rebuild replaces the previous version folder.

Multi-host: process i of N encodes the videos whose index in name order is i mod N
(`--shard-index/--shard-count`, default `jax.process_index()/process_count()` after
`jax.distributed` start-up from the environment, see `tttjax.distributed`). When the shard
comes from JAX, all processes meet at a barrier and process 0 builds the dataset. With
explicit shards the build runs on shard 0 only if every source file is present; otherwise it
lists what is missing, and `--build-only` (no encoding; it reads only the VAE's and text
encoder's config.json, for the dataset's shapes) builds it once every shard is done.

Resumable: a source file is written to a temporary name and renamed, so an existing
`<id>.npz` is complete and is skipped (delete it to recompute).

`--vae` and `--text-encoder` may be `gs://` folders: each is copied to a temporary local
folder (of a pipeline folder only vae/, or text_encoder/ and tokenizer/), read there and
deleted, so the host needs that much free disk; `--data-dir` may be `gs://` too.

Bad input (missing folder, no videos, a video without storyboard or a storyboard without
video, an invalid storyboard, a video too short for its storyboard, a bad VAE or text
encoder folder, bad sizes) exits with code 2 and one line, before anything is written. With
`--skip-bad`, videos with a bad storyboard or too few frames are skipped with a warning and
an `<id>.skipped` note (holding the reason) next to the source files, so the dataset build
does not wait for them; they are checked again on the next run.

Reading and resampling the videos is `tttjax/precompute_frames.py`; building the dataset from
the source files, `tttjax/precompute_dataset.py` (their names stay importable from here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

from tttjax import storage
from tttjax.command_line import ArgumentParser, UsageError, fail
from tttjax.precompute_dataset import build_dataset, dataset_config
from tttjax.precompute_frames import (  # noqa: F401 - re-exported: tttjax.precompute.X
    VAEInputView, read_video, resize_center_crop, source_frame_indices, too_short_message,
    unit_range, video_header)

_PROG = "python -m tttjax.precompute"
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")


def _fail(message) -> int:
    return fail(_PROG, message)


def parse_args(argv):
    p = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of <id>.mp4 videos + <id>.json storyboards")
    p.add_argument("--vae", help="diffusers AutoencoderKLCogVideoX folder or CogVideoX pipeline "
                                 "folder (required; --build-only reads only its config); "
                                 "gs://... is copied to a local temporary folder first")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text-encoder", help="transformers T5EncoderModel folder with its tokenizer "
                                             "(or a CogVideoX pipeline folder); gs://... is "
                                             "copied to a local temporary folder first")
    text.add_argument("--hashed-text-dim", type=int,
                      help="use the download-free hashed text encoder with this embedding size")
    p.add_argument("--hashed-text-seed", type=int, default=0, help="seed of the hashed encoder")
    p.add_argument("--text-length", type=int, default=226, help="tokens per prompt (default 226)")
    p.add_argument("--manual-dir", required=True, help="where the per-video .npz files go")
    p.add_argument("--data-dir", required=True, help="TFDS data dir of the built dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--config-name", default="cogvideox5b",
                   help="base dataset config; other shapes get latents/<name>_<hash> as in "
                        "the training loader")
    p.add_argument("--height", type=int, help="frame height (default: the VAE's sample_height)")
    p.add_argument("--width", type=int, help="frame width (default: the VAE's sample_width)")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate the VAE sees (default 16)")
    p.add_argument("--frames-per-segment", type=int, default=12, help="latent frames per segment")
    p.add_argument("--prefix-frames", type=int, default=1, help="latent frames before segment 0")
    p.add_argument("--tile-batches", type=int, default=4,
                   help="VAE frame batches per jitted call (memory, not numbers)")
    p.add_argument("--shard-index", type=int, help="this process's shard (default: JAX's)")
    p.add_argument("--shard-count", type=int, help="number of shards (default: JAX's)")
    p.add_argument("--build-only", action="store_true",
                   help="only build the dataset from the existing source files")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip videos with a bad storyboard or too few frames (warn) instead of "
                        "stopping")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True)
class Item:
    video_id: str
    video: str
    storyboard: object  # tttjax.storyboard.Storyboard


def find_videos(folder: str) -> list[tuple[str, str, str]]:
    """[(id, video path, storyboard path)] in id order; UsageError if unpaired or empty."""
    if not os.path.isdir(folder):
        raise UsageError(f"--videos {folder!r} is not a folder")
    videos, boards = {}, set()
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_SUFFIXES:
            if stem in videos:
                raise UsageError(f"--videos: two videos named {stem!r} ({videos[stem]} and {name})")
            videos[stem] = name
        elif ext.lower() == ".json":
            boards.add(stem)
    if not videos:
        raise UsageError(f"--videos {folder!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    unpaired = sorted(set(videos) - boards)
    if unpaired:
        raise UsageError(f"video {videos[unpaired[0]]!r} in {folder} has no storyboard "
                         f"{unpaired[0]}.json ({len(unpaired)} video(s) without one)")
    orphans = sorted(boards - set(videos))
    if orphans:
        raise UsageError(f"storyboard {orphans[0]}.json in {folder} has no video "
                         f"({len(orphans)} storyboard(s) without one)")
    return [(v, os.path.join(folder, videos[v]), os.path.join(folder, v + ".json"))
            for v in sorted(videos)]


@dataclasses.dataclass(frozen=True)
class Plan:
    height: int
    width: int
    fps: float
    frames_per_segment: int
    prefix_frames: int
    temporal: int

    def video_frames(self, num_segments: int) -> int:
        from tttjax.storyboard import num_video_frames

        return num_video_frames(num_segments, self.frames_per_segment, self.prefix_frames,
                                self.temporal)


def check_item(vid: str, video: str, board_path: str, plan: Plan) -> Item:
    """Parses the storyboard and checks from the header that the video is long enough."""
    from tttjax.storyboard import load_storyboard

    board = load_storyboard(board_path)
    need = plan.video_frames(board.num_segments)
    meta = video_header(video)
    src_fps = float(meta.get("fps") or 0)
    duration = float(meta.get("duration") or 0)
    if src_fps > 0 and duration > 0:
        # the header's duration can be off by a frame; read_video does the exact check
        have = int(math.floor(duration * src_fps + 0.5))
        if source_frame_indices(need, src_fps, plan.fps)[-1] >= have + 1:
            raise UsageError(too_short_message(video, have, src_fps, need, plan.fps))
    return Item(vid, video, board)


def _vae_config(folder: str):
    from tttjax.models.vae_weights import config_from_diffusers
    from tttjax.safetensors_folder import model_folder, weight_files

    root = storage.path(folder)
    if not root.is_dir():
        raise UsageError(f"--vae {folder!r} is not a folder")
    try:
        if storage.is_url(folder):   # only config.json is read here: no local copy yet
            path = next((p for p in (root, root / "vae") if (p / "config.json").is_file()), None)
            if path is None:
                raise ValueError(f"no config.json in {folder!r} (nor in {folder!r}/vae); give "
                                 "the folder written by AutoencoderKLCogVideoX.save_pretrained")
            if not any(p.name.endswith(".safetensors") for p in path.iterdir()):
                raise ValueError(f"no .safetensors weights in {os.fspath(path)!r}")
            config = config_from_diffusers(json.loads((path / "config.json").read_text()))
        else:
            path = model_folder(folder, "vae", "AutoencoderKLCogVideoX.save_pretrained")
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                config = config_from_diffusers(json.load(f))
            weight_files(path)
    except (ValueError, OSError, TypeError) as err:
        raise UsageError(f"--vae {folder!r}: {err}") from None
    return config


def _shard(args) -> tuple[int, int, bool]:
    """(index, count, from_jax)."""
    if (args.shard_index is None) != (args.shard_count is None):
        raise UsageError("give both --shard-index and --shard-count, or neither")
    if args.shard_count is not None:
        if args.shard_count < 1 or not 0 <= args.shard_index < args.shard_count:
            raise UsageError(f"need 0 <= --shard-index < --shard-count, got {args.shard_index} "
                             f"and {args.shard_count}")
        return args.shard_index, args.shard_count, False
    from tttjax.distributed import initialize_from_env

    index, count = initialize_from_env()
    return index, count, count > 1


# ------------------------------------------------------------------------------ skipped videos


def _skip_marker(out_dir: str, vid: str) -> str:
    """Written for a video skipped under --skip-bad, so shard 0 knows it is not missing."""
    return os.path.join(out_dir, vid + ".skipped")


def _mark_skipped(out_dir: str, vid: str, err) -> None:
    print(f"{_PROG}: warning: skipping {vid}: {' '.join(str(err).split())}", file=sys.stderr,
          flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(_skip_marker(out_dir, vid), "w", encoding="utf-8") as f:
        f.write(" ".join(str(err).split()) + "\n")


# ------------------------------------------------------------------------------ main


def _text_dim(args) -> int:
    """The text embedding size, without loading the encoder."""
    if args.hashed_text_dim is not None:
        return args.hashed_text_dim
    folder = args.text_encoder
    root = storage.path(folder)
    if not root.is_dir():
        raise UsageError(f"--text-encoder {folder!r} is not a folder")
    sub = root / "text_encoder"
    try:
        return int(json.loads(((sub if sub.is_dir() else root) / "config.json").read_text())
                   ["d_model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--text-encoder {folder!r}: no readable T5 config.json with d_model "
                         "(give a transformers T5EncoderModel folder or a CogVideoX pipeline "
                         "folder)") from None


def _load_text_encoder(args):
    if args.hashed_text_dim is not None:
        from tttjax.data.text_encoder import HashedTextEncoder

        return HashedTextEncoder(args.hashed_text_dim, seed=args.hashed_text_seed)
    from tttjax.text.t5 import T5TextEncoder

    try:
        return T5TextEncoder.from_pretrained(args.text_encoder)
    except (ValueError, OSError) as err:
        raise UsageError(f"--text-encoder {args.text_encoder!r}: {err}") from None


def encode_item(item: Item, vae, text_encoder, plan: Plan, text_length: int, tile_batches: int):
    """(mean [T, C, h, w], logvar [T, C, h, w], text [n, S, D]) float32 for one video."""
    board = item.storyboard
    frames = read_video(item.video, plan.video_frames(board.num_segments), plan.fps,
                        plan.height, plan.width)
    mean, logvar = vae.encode(VAEInputView(frames), tile_batches=tile_batches)
    text = np.asarray(text_encoder.encode(board.prompts, max_length=text_length), np.float32)
    return np.asarray(mean[0]), np.asarray(logvar[0]), text


def scene_markers(storyboard) -> tuple[np.ndarray, np.ndarray]:
    """(scene_start, scene_end) bool [n], as the storyboard's prompts carry them."""
    start = storyboard.scene_flags
    return start, np.append(start[1:], False)


def _check_args(args) -> None:
    for flag in ("text_length", "frames_per_segment", "tile_batches"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.prefix_frames < 0:
        raise UsageError(f"--prefix-frames must be >= 0, got {args.prefix_frames}")
    if not args.fps > 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.hashed_text_dim is not None and args.hashed_text_dim < 2:
        raise UsageError(f"--hashed-text-dim must be >= 2, got {args.hashed_text_dim}")
    if not args.split or os.sep in args.split or args.split.startswith("."):
        raise UsageError(f"--split {args.split!r} must be a plain folder name")
    # both set the dataset's shapes, so --build-only needs them too
    if args.vae is None:
        raise UsageError("--vae is required (a diffusers AutoencoderKLCogVideoX folder)")
    if args.text_encoder is None and args.hashed_text_dim is None:
        raise UsageError("give --text-encoder T5_FOLDER or --hashed-text-dim D")
    if storage.is_url(args.manual_dir):
        raise UsageError(f"--manual-dir {args.manual_dir!r}: the per-video source files need a "
                         "local or shared folder; only --data-dir (the built dataset) may be "
                         "gs://...")
    for flag, path in (("--manual-dir", args.manual_dir), ("--data-dir", args.data_dir)):
        if storage.is_url(path):
            continue
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is not a folder")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tttjax.storyboard import StoryboardError

    try:
        _check_args(args)
        pairs = find_videos(args.videos)
        vae_cfg = _vae_config(args.vae)
        text_dim = _text_dim(args)
        height = args.height or vae_cfg.sample_height
        width = args.width or vae_cfg.sample_width
        s = vae_cfg.spatial_compression
        if height < s or width < s or height % s or width % s:
            raise UsageError(f"--height/--width {height}x{width} must be positive multiples of "
                             f"the VAE's spatial compression {s}")
        plan = Plan(height, width, args.fps, args.frames_per_segment, args.prefix_frames,
                    vae_cfg.temporal_compression_ratio)
        shard_index, shard_count, from_jax = _shard(args)
        out_dir = os.path.join(args.manual_dir, args.split)
        todo, done, bad = [], [], []
        if not args.build_only:
            for i, (vid, video, board) in enumerate(pairs):
                if i % shard_count != shard_index:
                    continue
                if os.path.isfile(os.path.join(out_dir, vid + ".npz")):
                    done.append(vid)
                    continue
                try:
                    todo.append(check_item(vid, video, board, plan))
                except (UsageError, StoryboardError) as err:
                    if not args.skip_bad:
                        raise
                    _mark_skipped(out_dir, vid, err)
                    bad.append(vid)
    except (UsageError, StoryboardError) as err:
        return _fail(err)

    overrides = dict(latent_channels=vae_cfg.latent_channels, text_length=args.text_length,
                     text_embed_dim=text_dim, frames_per_segment=args.frames_per_segment,
                     prefix_frames=args.prefix_frames, scaling_factor=float(vae_cfg.scaling_factor))
    try:
        config = dataset_config(args.config_name, overrides)
    except ValueError as err:
        return _fail(f"--config-name: {err}")
    encoded = 0
    if todo:
        try:
            encoded = _encode_all(args, todo, plan, config, out_dir, bad)
        except UsageError as err:
            return _fail(err)

    if from_jax:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tttjax.precompute: source files written")
    summary = (f"shard {shard_index}/{shard_count}: encoded {encoded}, skipped {len(done)} "
               f"already done, {len(bad)} bad")
    if shard_index != 0 and (from_jax or not args.build_only):  # one builder per dataset
        print(f"{summary}; shard 0 (or --build-only) builds the dataset", flush=True)
        return 0
    ids = [v for v, _, _ in pairs]
    missing = [v for v in ids if not os.path.isfile(os.path.join(out_dir, v + ".npz"))
               and not os.path.isfile(_skip_marker(out_dir, v))]
    if missing:
        message = (f"{len(missing)} of {len(ids)} source files missing in {out_dir} (e.g. "
                   f"{', '.join(missing[:3])})")
        if args.build_only:
            return _fail(f"--build-only: {message}; run every shard first")
        print(f"{summary}; dataset not built: {message}; run the other shards, then "
              "--build-only", flush=True)
        return 0
    try:
        where = build_dataset(args.manual_dir, args.data_dir, config)
    except ValueError as err:
        return _fail(f"dataset build failed: {err}")
    base = dataset_config(args.config_name, {})
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    print(f"{summary}; dataset latents/{config.name} in {where} (train with "
          f"data.dataset=latents, data.builder_config={args.config_name}"
          + (f", data.builder_overrides={changed}" if changed else "")
          + ")", flush=True)
    return 0


def _encode_all(args, todo, plan, config, out_dir, bad) -> int:
    """Encodes and writes every item of `todo`; returns how many were written."""
    from tqdm import tqdm

    from tttjax.data.latents import write_source_example
    from tttjax.models.vae_weights import from_diffusers_vae

    try:
        vae, _ = from_diffusers_vae(args.vae)
    except (ValueError, OSError) as err:
        raise UsageError(f"--vae {args.vae!r}: {err}") from None
    text_encoder = _load_text_encoder(args)
    encoded = 0
    for item in tqdm(todo, desc="precompute", unit="video", file=sys.stdout):
        try:
            mean, logvar, text = encode_item(item, vae, text_encoder, plan, args.text_length,
                                             args.tile_batches)
        except UsageError as err:
            if not args.skip_bad:
                raise
            _mark_skipped(out_dir, item.video_id, err)
            bad.append(item.video_id)
            continue
        want = config.prefix_frames + item.storyboard.num_segments * config.frames_per_segment
        if mean.shape[0] != want:
            raise UsageError(f"{item.video}: the VAE made {mean.shape[0]} latent frames, the "
                             f"storyboard needs {want}; --prefix-frames/--frames-per-segment do "
                             "not fit this VAE")
        start, end = scene_markers(item.storyboard)
        write_source_example(os.path.join(out_dir, item.video_id + ".npz"), latents_mean=mean,
                             latents_logvar=logvar, text=text, scene_start=start, scene_end=end,
                             captions=item.storyboard.captions, config=config)
        if os.path.exists(_skip_marker(out_dir, item.video_id)):
            os.remove(_skip_marker(out_dir, item.video_id))
        encoded += 1
    return encoded


if __name__ == "__main__":
    sys.exit(main())
