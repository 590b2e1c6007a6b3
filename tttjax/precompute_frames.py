"""Video files -> the frames the VAE encodes, for `python -m tttjax.precompute`.

A storyboard of n segments needs the first `num_frames` frames of its video at `fps`: output
frame k is the source frame shown at time k / fps (`source_frame_indices`: frames dropped, or
repeated for slower sources), scaled (bicubic) to cover height x width and center-cropped
(`resize_center_crop`), read through ffmpeg (`read_video`, `video_header`). `VAEInputView`
presents uint8 frames as the VAE's float input in [-1, 1] (`unit_range`), tile by tile.
Unreadable or too short videos raise `UsageError` naming the file.
"""

from __future__ import annotations

import warnings

import numpy as np

from tttjax.command_line import UsageError
from tttjax.optional_dependency import require


def source_frame_indices(num_frames: int, source_fps: float, fps: float) -> np.ndarray:
    """int [num_frames]: the source frame shown at time k / fps, for k < num_frames."""
    k = np.arange(num_frames, dtype=np.float64)
    return np.floor(k * source_fps / fps + 1e-6).astype(np.int64)


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: bicubic scale to cover, center crop."""
    from PIL import Image

    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    img = Image.fromarray(frame).resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def _start(reader) -> dict:
    """Starts an imageio_ffmpeg reader; returns the video's metadata."""
    with warnings.catch_warnings():
        # JAX warns on every fork; this child execs ffmpeg at once, so the threads it warns
        # about are never used there.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        return next(reader)


def video_header(path: str) -> dict:
    """ffmpeg's metadata of a video (fps, size, duration) without decoding frames."""
    imageio_ffmpeg = require("imageio_ffmpeg", "video", "reading videos")

    reader = imageio_ffmpeg.read_frames(path)
    try:
        return _start(reader)
    except (OSError, RuntimeError, StopIteration) as err:
        raise UsageError(f"{path}: not a readable video ({' '.join(str(err).split())[:200]})"
                         ) from None
    finally:
        reader.close()


def read_video(path: str, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """The first `num_frames` frames of `path` at `fps`, resized: uint8 [T, H, W, 3].

    Raises UsageError naming the file when the video is shorter.
    """
    imageio_ffmpeg = require("imageio_ffmpeg", "video", "reading videos")

    reader = imageio_ffmpeg.read_frames(path)
    try:
        meta = _start(reader)
        src_fps = float(meta.get("fps") or 0)
        if src_fps <= 0:
            raise UsageError(f"{path}: ffmpeg reports no frame rate; re-encode the video")
        w, h = meta["size"]
        wanted = source_frame_indices(num_frames, src_fps, fps)
        out = np.empty((num_frames, height, width, 3), np.uint8)
        k, index = 0, 0
        for raw in reader:
            if k == num_frames:
                break
            frame = None
            while k < num_frames and wanted[k] == index:
                if frame is None:
                    rgb = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
                    frame = resize_center_crop(rgb, height, width)
                out[k] = frame
                k += 1
            index += 1
    finally:
        reader.close()
    if k < num_frames:
        raise UsageError(too_short_message(path, index, src_fps, num_frames, fps))
    return out


def unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., T, H, W, 3] -> float32 [..., T, 3, H, W] in [-1, 1] (the VAE's input)."""
    return np.moveaxis(frames.astype(np.float32) / 127.5 - 1.0, -1, -3)


class VAEInputView:
    """uint8 frames [T, H, W, 3] seen as the VAE's input [1, T, 3, H, W] float32 in [-1, 1].

    `CogVideoXVAE.encode` slices its input one temporal (and spatial) tile at a time, so only
    the tile being encoded is converted to float: a 63 s video at 480 x 720 is held as 1 GB of
    uint8 instead of 4 GB of float32.
    """

    def __init__(self, frames: np.ndarray):
        self.frames = frames
        t, h, w, c = frames.shape
        self.shape = (1, t, c, h, w)

    def __getitem__(self, index: tuple) -> np.ndarray:
        b, t, c, h, w = index
        return unit_range(self.frames[None][b, t, h, w])[:, :, c]


def too_short_message(path, have, src_fps, need, fps) -> str:
    """One line: the video at `path` is shorter than its storyboard needs."""
    return (f"{path}: has {have} frames at {src_fps:g} fps ({have / src_fps:.2f} s) but its "
            f"storyboard needs {need} frames at {fps:g} fps ({(need - 1) / fps:.2f} s); shorten "
            "the storyboard or use a longer video")
