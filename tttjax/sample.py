"""Sample a video for a storyboard from a checkpoint.

    python -m tttjax.sample --workdir DIR --storyboard FILE.json --out OUT.mp4 \\
        [--seed S] [--steps N] [--sampler dpm++2m_sde|ddim] [--guidance 4.0] \\
        [--gif OUT.gif] [--contact-sheet OUT.png] [--vae DIR]
        [--text-encoder DIR | --hashed-text-seed S]
    python -m tttjax.sample --workdir DIR --prompt "segment 1" --prompt "segment 2" \\
        [--negative-prompt TEXT] --out OUT.mp4 [...]

--workdir is a training workdir (its latest checkpoint; `python -m tttjax.train`), a
converted checkpoint (`python -m tttjax.convert`) or an exported folder (`python -m
tttjax.export`, which samples as its source). Checkpoints trained on real latents and
converted CogVideoX checkpoints also need --vae and --text-encoder (or --hashed-text-seed
when their data was pre-computed with the hashed encoder; see `tttjax.generation`). The
storyboard (docs/design.md §6, `tttjax.storyboard`) sets the length:
n segments give (prefix + n * frames_per_segment - 1) * 4 + 1 frames (48n + 1 at 16 fps for
CogVideoX). The storyboard and output paths are checked before anything is loaded; a bad
one exits with code 2 and a one-line message and writes nothing (every output folder is
probed for writing before the model loads). A training workdir's checkpoint is verified
first: a corrupt one (files differing from its integrity manifest, non-finite parameters)
exits 2 naming it and the newest intact step. Outputs are written to a temporary name and
renamed; SIGTERM or Ctrl-C stops with exit code 130 and leaves no partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile

from tttjax import storage
from tttjax.command_line import ArgumentParser, UsageError, fail

_PROG = "python -m tttjax.sample"


def _fail(message) -> int:
    return fail(_PROG, message)


def _check_output(path: str | None, suffix: str, flag: str) -> str | None:
    if path is None:
        return None
    if not path.lower().endswith(suffix):
        raise UsageError(f"{flag} {path!r} must end in {suffix}")
    if storage.is_url(path):   # gs://...: written locally, then uploaded as one object
        probe = storage.path(path + ".tttjax-write-probe")
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except Exception as err:  # noqa: BLE001 - any client error means "cannot write"
            raise UsageError(f"{flag} {path!r}: cannot write there "
                             f"({' '.join(str(err).split())[:200]})") from None
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: {parent!r} is not a folder")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file name")
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path!r}: {existing!r} is not a folder")
    try:   # the only reliable test (permissions, read-only mounts, quotas): write something
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tttjax-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path!r}: cannot write in {existing!r} "
                         f"({err.strerror or err})") from None
    return path


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C while sampling or writing (exit code 130)."""


@contextlib.contextmanager
def interruptible():
    """SIGTERM and SIGINT raise `Interrupted` in the main thread while inside, so that
    `_atomic`'s clean-up of temporary files runs; the previous handlers are put back."""
    def stop(signum, frame):
        del frame
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _atomic(write, path: str, *args, **kwargs):
    """Writes through a temporary sibling file renamed into place (for a gs:// `path`, a
    local temporary file uploaded as one object: an upload appears whole or not at all)."""
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix="tttjax-sample-") as folder:
            local = os.path.join(folder, os.path.basename(path))
            out = write(*args, local, **kwargs)
            with open(local, "rb") as f:
                storage.path(path).write_bytes(f.read())
        return out
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial{ext}"
    try:
        out = write(*args, tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def write_outputs(video, out: str, gif: str | None = None, sheet: str | None = None
                  ) -> list[str]:
    """Writes the MP4 (and optional GIF / contact sheet) of a `tttjax.generation.Video`."""
    from tttjax import video_io

    if not storage.is_url(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _atomic(lambda frames, p: video_io.write_mp4(frames, p, fps=video.fps), out, video.frames)
    written = [out]
    if gif:
        every = max(1, round(video.fps / 8))          # GIFs above ~8 fps only grow the file
        _atomic(lambda frames, p: video_io.write_gif(frames, p, fps=video.fps, every=every,
                                                      max_width=480), gif, video.frames)
        written.append(gif)
    if sheet:
        _atomic(lambda frames, p: video_io.contact_sheet(
            frames, video.captions, video.frames_per_segment, p, prefix_frames=video.prefix_frames,
            fps=video.fps), sheet, video.frames)
        written.append(sheet)
    return written


def parse_args(argv):
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="training workdir, converted checkpoint or exported folder "
                             "(local or gs://)")
    parser.add_argument("--storyboard", default=None, help="storyboard JSON (docs/design.md §6)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="instead of --storyboard: one per 3-second segment, in order "
                             "(repeat the flag)")
    parser.add_argument("--negative-prompt", default="",
                        help="with --prompt: the negative prompt of every segment")
    parser.add_argument("--out", required=True, help="output MP4 file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--sampler", default="dpm++2m_sde", choices=("dpm++2m_sde", "ddim"))
    parser.add_argument("--guidance", type=float, default=None,
                        help="constant guidance scale (default: rising 1 -> 4, the paper's)")
    parser.add_argument("--gif", default=None, help="also write a GIF here")
    parser.add_argument("--contact-sheet", default=None,
                        help="also write a PNG with one frame and the caption per segment")
    parser.add_argument("--text-length", type=int, default=None,
                        help="tokens per prompt (default: the workdir's, 226 for converted)")
    parser.add_argument("--vae", default=None, help="diffusers AutoencoderKLCogVideoX folder")
    parser.add_argument("--text-encoder", default=None,
                        help="transformers T5EncoderModel folder (with its tokenizer)")
    parser.add_argument("--hashed-text-seed", type=int, default=None,
                        help="use the download-free hashed text encoder with this seed (data "
                             "pre-computed with `python -m tttjax.precompute --hashed-text-dim`)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tttjax.storyboard import StoryboardError, load_storyboard

    try:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        if args.text_length is not None and args.text_length < 1:
            raise UsageError(f"--text-length must be >= 1, got {args.text_length}")
        if args.guidance is not None and args.guidance < 0:
            raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
        _check_output(args.out, ".mp4", "--out")
        _check_output(args.gif, ".gif", "--gif")
        _check_output(args.contact_sheet, ".png", "--contact-sheet")
        if not storage.path(args.workdir).is_dir():
            raise UsageError(f"--workdir {args.workdir!r} is not a folder")
        if (args.storyboard is None) == (args.prompt is None):
            raise UsageError("give either --storyboard FILE.json or --prompt TEXT (once per "
                             "segment), not both or neither")
        if args.storyboard is not None:
            storyboard = load_storyboard(args.storyboard)
        else:
            from tttjax.pipeline import prompts_storyboard

            storyboard = prompts_storyboard(args.prompt, args.negative_prompt)
    except (UsageError, StoryboardError) as err:
        return _fail(err)

    from tqdm import tqdm

    from tttjax.diffusion.guidance import Guidance
    from tttjax.generation import generate, load_generator

    try:
        gen = load_generator(args.workdir, vae=args.vae, text_encoder=args.text_encoder,
                             hashed_text_seed=args.hashed_text_seed,
                             text_length=args.text_length)
    except ValueError as err:
        return _fail(err)
    n = storyboard.num_segments
    print(f"{gen.source}\nsampling {n} segment(s), {gen.num_frames(n)} frames at {gen.fps:g} fps, "
          f"{args.steps} {args.sampler} steps, seed {args.seed}", flush=True)
    guidance = Guidance() if args.guidance is None else args.guidance
    try:
        with interruptible():
            with tqdm(total=args.steps, desc="sample", unit="step", file=sys.stdout) as bar:
                video = generate(gen, storyboard, seed=args.seed, steps=args.steps,
                                 sampler=args.sampler, guidance=guidance,
                                 progress=lambda _: bar.update(1))
            written = write_outputs(video, args.out, args.gif, args.contact_sheet)
    except Interrupted as err:
        return fail(_PROG, f"interrupted ({err}); no partial output left", code=130)
    print(f"wrote {len(video.frames)} frames: {', '.join(written)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
