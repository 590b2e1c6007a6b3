"""Draws toon-world states (`tttjax.data.toon_world`) as RGB frames with PIL.

Flat-coloured shapes, a fixed camera: the room (wall, floor, furniture, the mouse hole) is a
background drawn once per scene; the cheese and the characters are drawn on top per frame.
The drawing is resolution-independent (every size is a fraction of the image), so the same
episode renders at 64 x 64 for tests and at 480 x 720 like CogVideoX's training videos.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from tttjax.data import toon_world as world

_DARK = (30, 24, 22)
_CHEESE = (250, 206, 40)
_FURNITURE = {  # kind: (colour, width, height, on the wall?)
    "table": ((120, 74, 40), 0.26, 0.16, False),
    "stove": ((70, 70, 76), 0.16, 0.24, False),
    "cupboard": ((150, 104, 62), 0.18, 0.40, False),
    "sofa": ((170, 60, 70), 0.32, 0.16, False),
    "bed": ((90, 110, 190), 0.34, 0.14, False),
    "lamp": ((240, 230, 150), 0.06, 0.36, False),
    "barrel": ((120, 80, 46), 0.14, 0.18, False),
    "crate": ((176, 140, 90), 0.16, 0.14, False),
    "shelf": ((110, 80, 50), 0.24, 0.04, True),
    "window": ((190, 228, 250), 0.18, 0.18, True),
    "door": ((120, 76, 44), 0.16, 0.42, False),
    "rug": ((150, 50, 120), 0.36, 0.05, False),
}


def _box(cx, cy, w, h, W, H):
    return [(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H]


@functools.lru_cache(maxsize=64)
def _background(room: world.Room, height: int, width: int) -> Image.Image:
    W, H = width, height
    img = Image.new("RGB", (W, H), room.wall)
    d = ImageDraw.Draw(img)
    d.rectangle([0, world.FLOOR_Y * H, W, H], fill=room.floor)
    for kind, x in room.furniture:
        color, w, h, on_wall = _FURNITURE[kind]
        if kind == "rug":
            cy = world.GROUND_Y + 0.03
        elif on_wall:
            cy = world.FLOOR_Y - 0.28
        else:
            cy = world.FLOOR_Y + 0.12 - h / 2
        d.rectangle(_box(x, cy, w, h, W, H), fill=color)
        if kind == "window":
            d.line([x * W, (cy - h / 2) * H, x * W, (cy + h / 2) * H], fill=(255, 255, 255),
                   width=max(1, W // 160))
    # The mouse hole: a dark arch at the foot of the wall.
    hw, hh = 0.07, 0.11
    d.pieslice(_box(room.hole_x, world.FLOOR_Y, hw, 2 * hh, W, H), 180, 360, fill=_DARK)
    return img


def _draw_cat(d: ImageDraw.ImageDraw, s: world.State, W: int, H: int) -> None:
    color = world.CAT_COLORS[s.cat_color]
    outline = _DARK if s.cat_color != "black" else (200, 200, 200)
    (cx, cy), _ = s.positions()
    bw, bh = world.CAT_SIZE
    if s.cat_asleep:  # curled up: a flat oval with the head tucked in
        d.ellipse(_box(cx, world.GROUND_Y - bh * 0.3, bw * 0.9, bh * 0.6, W, H), fill=color,
                  outline=outline)
        return
    f = s.cat_facing
    d.ellipse(_box(cx, cy, bw, bh, W, H), fill=color, outline=outline)
    # tail behind, head in front
    tx = cx - f * bw * 0.5
    d.line([tx * W, cy * H, (tx - f * 0.06) * W, (cy - 0.12) * H], fill=color,
           width=max(1, int(0.025 * W)))
    hx, hy, hr = cx + f * bw * 0.42, cy - bh * 0.55, 0.065
    for ex in (-0.6, 0.6):  # ears
        ear = [((hx + ex * hr) * W, (hy - hr * 0.5) * H),
               ((hx + ex * hr * 0.2) * W, (hy - hr * 0.6) * H),
               ((hx + ex * hr * 0.9) * W, (hy - hr * 1.6) * H)]
        d.polygon(ear, fill=color, outline=outline)
    d.ellipse(_box(hx, hy, 2 * hr, 2 * hr, W, H), fill=color, outline=outline)
    d.ellipse(_box(hx + f * hr * 0.45, hy - hr * 0.15, 0.02, 0.02, W, H), fill=(40, 170, 60))


def _draw_mouse(d: ImageDraw.ImageDraw, s: world.State, W: int, H: int) -> None:
    color = world.MOUSE_COLORS[s.mouse_color]
    _, (cx, cy) = s.positions()
    bw, bh = world.MOUSE_SIZE
    f = s.mouse_facing
    tx = cx - f * bw * 0.5
    d.line([tx * W, cy * H, (tx - f * 0.05) * W, (cy + 0.01) * H], fill=(230, 150, 160),
           width=max(1, W // 200))
    d.ellipse(_box(cx, cy, bw, bh, W, H), fill=color, outline=_DARK)
    hx, hy = cx + f * bw * 0.5, cy - bh * 0.2
    d.ellipse(_box(hx - f * 0.01, hy - 0.03, 0.04, 0.04, W, H), fill=(240, 170, 180), outline=_DARK)
    d.ellipse(_box(hx, hy, 0.045, 0.04, W, H), fill=color, outline=_DARK)


def _draw_cheese(d: ImageDraw.ImageDraw, s: world.State, W: int, H: int) -> None:
    size = 0.04 + 0.05 * s.cheese
    x, y = s.cheese_x, world.GROUND_Y
    d.polygon([((x - size) * W, y * H), ((x + size) * W, y * H),
               ((x + size) * W, (y - size) * H)], fill=_CHEESE, outline=(160, 120, 20))


def render_state(state: world.State, height: int, width: int) -> np.ndarray:
    """One frame: uint8 [height, width, 3]."""
    img = _background(state.room, height, width).copy()
    d = ImageDraw.Draw(img)
    if state.cheese > 0:
        _draw_cheese(d, state, width, height)
    _draw_cat(d, state, width, height)
    if state.mouse_visible:
        _draw_mouse(d, state, width, height)
    return np.asarray(img, dtype=np.uint8)


def render_episode(episode: world.Episode, height: int, width: int) -> np.ndarray:
    """All frames of an episode: uint8 [1 + n * F, height, width, 3]."""
    return np.stack([render_state(s, height, width) for s in episode.states()])
