"""MP4 / GIF writers read back with imageio; the contact sheet's layout and picked frames."""

import imageio.v2 as iio2
import imageio.v3 as iio3
import numpy as np
import pytest
from PIL import Image

from tttjax.video_io import (
    contact_sheet,
    segment_frame_indices,
    to_uint8,
    write_gif,
    write_mp4,
)


def _video(t, h, w):
    """Smooth, distinct frames: a gradient whose colour shifts with time."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([(xx * 255 // max(w - 1, 1) + 20 * i) % 256,
                        (yy * 255 // max(h - 1, 1)) % 256,
                        np.full_like(xx, (40 * i) % 256)], -1) for i in range(t)]
    return np.asarray(frames, np.uint8)


def _read_mp4(path):
    reader = iio2.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        frames = np.stack([f for f in reader.iter_data()])
    finally:
        reader.close()
    return frames, meta


def test_mp4_round_trip(tmp_path):
    video = _video(17, 32, 48)
    path = str(tmp_path / "sub" / "out.mp4")
    assert write_mp4(video, path, fps=16) == 17
    back, meta = _read_mp4(path)
    assert back.shape == video.shape
    assert meta["fps"] == 16
    assert np.mean(np.abs(back.astype(np.int32) - video)) < 8  # lossy, but the same pictures


def test_mp4_streams_frames_and_pads_odd_sizes(tmp_path):
    video = _video(5, 33, 47)
    path = str(tmp_path / "odd.mp4")
    assert write_mp4((f for f in video), path, fps=8) == 5  # a generator, not an array
    back, meta = _read_mp4(path)
    assert back.shape == (5, 34, 48, 3) and meta["fps"] == 8
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(video.astype(np.float32), str(tmp_path / "bad.mp4"))
    with pytest.raises(ValueError, match="size"):
        write_mp4([video[0], video[1, :32, :46]], str(tmp_path / "bad2.mp4"))


def test_gif_round_trip(tmp_path):
    video = _video(12, 24, 40)
    path = str(tmp_path / "out.gif")
    assert write_gif(video, path, fps=10) == 12
    back = iio3.imread(path, index=None)
    assert back.shape[:3] == (12, 24, 40)
    assert iio3.immeta(path, index=0)["duration"] == 100  # ms per frame
    small = str(tmp_path / "small.gif")
    assert write_gif(video, small, fps=16, every=2, max_width=20) == 6
    assert iio3.imread(small, index=None).shape[:3] == (6, 12, 20)


def test_to_uint8():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0]), 0.0, 1.0), [0, 128, 255])


def test_contact_sheet(tmp_path):
    colours = [(255, 0, 0), (0, 160, 0), (0, 0, 255)]
    fps_seg, n = 8, 3
    frames = np.full((1 + n * fps_seg, 30, 40, 3), 200, np.uint8)
    for i, c in enumerate(colours):  # segment i's frames in its own colour
        frames[1 + i * fps_seg:1 + (i + 1) * fps_seg] = c
    captions = ["The cat jumps.", "The mouse runs " * 30, "<start_scene> A new room."]
    path = str(tmp_path / "sheet.png")
    sheet = contact_sheet(frames, captions, fps_seg, path, columns=2, thumb_width=40, max_lines=3)
    png = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(png, sheet)
    pad, cell_w = 8, 40 + 16
    assert sheet.shape[1] == 2 * cell_w
    for i, c in enumerate(colours):  # each thumbnail shows its segment's middle frame
        x0 = (i % 2) * cell_w + pad
        y0 = (i // 2) * (sheet.shape[0] // 2) + pad
        np.testing.assert_array_equal(sheet[y0 + 15, x0 + 20], c)
        caption_area = sheet[y0 + 30 + pad:y0 + 30 + pad + 40, x0:x0 + 40]
        assert (caption_area.min(axis=-1) < 100).any()  # text was drawn
    assert segment_frame_indices(25, 3, 8) == [5, 13, 21]


def test_contact_sheet_errors():
    frames = np.zeros((9, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="cannot hold"):
        contact_sheet(frames, ["a", "b"], frames_per_segment=8)
    with pytest.raises(ValueError, match="caption"):
        contact_sheet(frames, [], frames_per_segment=8)
