"""Video files from sampled frames: MP4 (H.264 via imageio-ffmpeg), GIF, and a contact sheet.

    write_mp4(frames, "out.mp4", fps=16)          frames: uint8 [T, H, W, 3] (or an iterable of
                                                  [H, W, 3] frames, streamed to ffmpeg)
    write_gif(frames, "out.gif", fps=16, every=2, max_width=360)
    contact_sheet(frames, captions, frames_per_segment=48, path="sheet.png")

`to_uint8` maps decoder output (float, [-1, 1] by default) to uint8. H.264 in yuv420p (the
format players accept) needs even sizes: odd heights or widths are padded by repeating the
last row / column.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tttjax.optional_dependency import require


def to_uint8(frames, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Float frames in [low, high] -> uint8 [0, 255] (clipped, rounded); same shape."""
    x = (np.asarray(frames, np.float32) - low) / (high - low)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_frame(frame: np.ndarray, what: str = "frames") -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [H, W, 3] images, got {frame.dtype} "
                         f"{frame.shape}; convert float frames with tttjax.video_io.to_uint8")
    return frame


def _check_video(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} "
                         f"{frames.shape}; convert float frames with tttjax.video_io.to_uint8")
    return frames


def _even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame


def _parent(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def write_mp4(frames: np.ndarray | Iterable[np.ndarray], path: str, fps: float = 16,
              quality: float = 8.0) -> int:
    """Writes an H.264 MP4 (yuv420p); returns the number of frames written.

    Args:
      frames: uint8 [T, H, W, 3], or an iterable of uint8 [H, W, 3] frames of one size
        (streamed: a one-minute video need not be in memory at once).
      path: output file (folders are created).
      fps: frames per second (16 for CogVideoX).
      quality: imageio-ffmpeg quality, 0 (worst) to 10 (best).
    """
    imageio_ffmpeg = require("imageio_ffmpeg", "video", "writing MP4")

    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if isinstance(frames, np.ndarray):
        _check_video(frames)
    _parent(path)
    writer, size, count = None, None, 0
    try:
        for frame in frames:
            frame = _even(_check_frame(frame))
            if writer is None:
                size = frame.shape[:2]
                writer = imageio_ffmpeg.write_frames(
                    path, (size[1], size[0]), fps=fps, codec="libx264", quality=quality,
                    macro_block_size=1, ffmpeg_log_level="error", pix_fmt_in="rgb24",
                    pix_fmt_out="yuv420p")
                with warnings.catch_warnings():
                    # JAX warns on every fork; this child execs ffmpeg at once, so the
                    # threads it warns about are never used there.
                    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                            category=RuntimeWarning)
                    writer.send(None)
            elif frame.shape[:2] != size:
                raise ValueError(f"frame {count} has size {frame.shape[:2]}, the first had {size}")
            writer.send(np.ascontiguousarray(frame))
            count += 1
    finally:
        if writer is not None:
            writer.close()
    if count == 0:
        raise ValueError("no frames to write")
    return count


def write_gif(frames: np.ndarray, path: str, fps: float = 16, *, every: int = 1,
              max_width: int | None = None) -> int:
    """Writes a looping GIF; returns the number of frames written.

    Args:
      frames: uint8 [T, H, W, 3].
      fps: playback rate of the original frames.
      every: keep every `every`-th frame (the GIF plays at fps / every, same duration).
      max_width: downscale (keeping the aspect ratio) to at most this width.
    """
    iio = require("imageio.v3", "video", "writing GIF")

    frames = _check_video(frames)
    if fps <= 0 or every < 1:
        raise ValueError(f"need fps > 0 and every >= 1, got fps={fps}, every={every}")
    frames = frames[::every]
    h, w = frames.shape[1:3]
    if max_width is not None and w > max_width:
        size = (max_width, max(1, round(h * max_width / w)))
        frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR))
                           for f in frames])
    _parent(path)
    iio.imwrite(path, frames, extension=".gif", duration=1000.0 * every / fps, loop=0)
    return len(frames)


def caption_font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at `size` pixels (FreeType), or its fixed bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends in an ellipsis if cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            while font.getlength(word) > width and len(word) > 1:  # split over-long words
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def segment_frame_indices(num_frames: int, num_segments: int, frames_per_segment: int,
                          prefix_frames: int = 1) -> list[int]:
    """The middle frame of each segment (segment i spans prefix + [i*f, (i+1)*f))."""
    return [min(num_frames - 1, prefix_frames + i * frames_per_segment + frames_per_segment // 2)
            for i in range(num_segments)]


def contact_sheet(frames: np.ndarray, captions: Sequence[str], frames_per_segment: int,
                  path: str | None = None, *, prefix_frames: int = 1, fps: float = 16,
                  columns: int | None = None, thumb_width: int = 320, font_size: int = 14,
                  max_lines: int = 8) -> np.ndarray:
    """One frame per segment (its middle frame) with the segment's time span and caption below.

    Args:
      frames: uint8 [T, H, W, 3] the whole video.
      captions: one caption per segment.
      frames_per_segment: video frames per segment (48 for CogVideoX's 3 s at 16 fps).
      path: PNG file to write (skipped when None).
      prefix_frames: frames before the first segment (1: CogVideoX's causal first frame).
      columns: thumbnails per row (default: up to 4).
      thumb_width: thumbnail width in pixels (frames are scaled to it, up or down).
    Returns:
      uint8 [H', W', 3] the sheet.
    """
    frames = _check_video(frames)
    n = len(captions)
    if n < 1:
        raise ValueError("contact_sheet needs at least one caption (one per segment)")
    if frames_per_segment < 1 or len(frames) < prefix_frames + (n - 1) * frames_per_segment + 1:
        raise ValueError(f"{len(frames)} frames cannot hold {n} segments of {frames_per_segment} "
                         f"frames after {prefix_frames} prefix frame(s)")
    columns = columns or min(n, 4)
    rows = -(-n // columns)
    h, w = frames.shape[1:3]
    tw = thumb_width
    th = max(1, round(h * tw / w))
    # Small videos are enlarged with hard pixel edges (a blurred 8 x 8 mosaic shows nothing).
    resample = Image.NEAREST if tw > w else Image.BILINEAR
    font, pad = caption_font(font_size), 8
    line_h = font.getbbox("Hg")[3] + 4
    texts = [_wrap(c, font, tw, max_lines) for c in captions]
    text_h = line_h * (1 + max(len(t) for t in texts))
    cell_w, cell_h = tw + 2 * pad, th + text_h + 3 * pad
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    seconds = frames_per_segment / fps
    for i, idx in enumerate(segment_frame_indices(len(frames), n, frames_per_segment,
                                                  prefix_frames)):
        x0, y0 = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
        sheet.paste(Image.fromarray(frames[idx]).resize((tw, th), resample), (x0, y0))
        y = y0 + th + pad
        label = f"{i + 1}   {i * seconds:.0f}-{(i + 1) * seconds:.0f} s"
        draw.text((x0, y), label, fill=(90, 90, 90), font=font)
        for line in texts[i]:
            y += line_h
            draw.text((x0, y), line, fill=(0, 0, 0), font=font)
    out = np.asarray(sheet)
    if path is not None:
        _parent(path)
        sheet.save(path, format="PNG")
    return out
