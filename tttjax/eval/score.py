"""`following` and `consistency`: how well a toon video plays its storyboard, in [0, 1].

The video's frames are read by the toon detector (`tttjax.eval.detector`, trained on the
renderer's ground truth only) and compared with what each segment's text says. A video of n
segments has `1 + n F` frames: frame 0, then F per 3-second segment (the toon world's and
CogVideoX's layout); segment s is frames `1 + s F .. (s + 1) F`, and its "start" is the frame
before them (the last frame of segment s - 1, or frame 0).

following (per segment, then averaged over segments): the mean of
  action     the action the first sentence names, checked on the detected tracks:
               cat_walks / mouse_runs   the character moves (> 0.1) and ends on the named side
               cat_chases_mouse         both move (> 0.1) in the named direction
               mouse_hides / peeks_out  the mouse is visible at the start and not at the end /
                                        the other way round
               cat_jumps                the cat rises (> 0.08 above its start and end height)
                                        and lands in the named direction
               mouse_eats_cheese        the mouse is visible and the cheese shrinks (> 0.2)
               cat_sleeps               the cat is awake at the start and asleep at the end
               cat_waits_by_hole        the mouse stays hidden and the cat ends by a hole
                                        (0.12 of x = 0.26 or 0.74) awake
               mouse_hops               the mouse is visible and bobs (> 0.04 up and down)
             each is the fraction of its conditions met; text naming no known action
             (a free-form prompt) skips this term
  setting    the room kind, wall colour and floor the text names (those it names) are the
             detected majority classes over the segment's frames
  colours    the cat's / mouse's colour named in the text is the detected majority class
  scene      a scene change is detected at the segment's start (the wall, floor or room
             class, from the class probabilities averaged over each segment's frames, differs
             from the previous segment's) exactly where the storyboard asks for one
             (`requires_scene_transition`; not scored on segment 0)

consistency (per video): the mean of
  identity   over the whole video, the fraction of frames whose cat colour class is the
             video's majority one (and the same for the mouse, on frames where it is visible)
  room look  within each storyboard scene, the fraction of frames whose wall and floor
             classes are the scene's majority ones
  continuity at each segment boundary inside a scene, the cat (and the mouse, when visible
             on both sides) moves at most 0.1 between the two frames: 1 at <= 0.1, 0 at
             >= 0.3 (linear in between); 1 when the video has no such boundary
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from tttjax.data import toon_world
from tttjax.eval.detector import CLASSES

_SIDES = ("left side", "middle", "right side")
_ACTION_PATTERNS = (
    ("cat_walks", r"\bcat walks \w+ over to the (left side|right side|middle)"),
    ("mouse_runs", r"\bmouse scurries over to the (left side|right side|middle)"),
    ("cat_chases_mouse", r"\bcat chases the \w+ mouse across the [\w ]+? to the (left|right)"),
    ("mouse_hides", r"\bmouse darts into the mouse hole"),
    ("mouse_peeks_out", r"\bmouse peeks out of its hole"),
    ("cat_jumps", r"\bcat jumps high into the air and lands to the (left|right)"),
    ("mouse_eats_cheese", r"\bmouse runs to the piece of cheese"),
    ("cat_sleeps", r"\bcat curls up on the floor and falls asleep"),
    ("cat_waits_by_hole", r"\bcat walks to the mouse hole and waits"),
    ("mouse_hops", r"\bmouse hops up and down"),
)


@dataclasses.dataclass(frozen=True)
class SegmentText:
    """What one segment's text asks for (None where it says nothing)."""

    action: str | None
    argument: str | None             # side or direction of the action
    room: str | None
    wall: str | None
    floor: str | None
    cat_color: str | None
    mouse_color: str | None


def parse_text(text: str) -> SegmentText:
    """Reads a toon caption (or any prompt using its words) into what it asks for."""
    low = " ".join(text.lower().split())
    action = argument = None
    for name, pattern in _ACTION_PATTERNS:
        m = re.search(pattern, low)
        if m:
            action, argument = name, (m.group(1) if m.groups() else None)
            break
    room = next((r for r in CLASSES["room"] if f"the {r} has" in low), None)
    if room is None:
        room = next((r for r in CLASSES["room"] if re.search(rf"\b{r}\b", low)), None)
    wall = next((w for w in CLASSES["wall"] if re.search(rf"\b{w} walls\b", low)), None)
    floor = next((f for f in CLASSES["floor"] if f in low), None)
    cat = next((c for c in CLASSES["cat_color"] if re.search(rf"\b{c} cat\b", low)), None)
    mouse = next((c for c in CLASSES["mouse_color"]
                  if re.search(rf"\b{c} mouse\b", low)), None)
    return SegmentText(action, argument, room, wall, floor, cat, mouse)


def _majority(probs: np.ndarray) -> int:
    return int(np.bincount(probs.argmax(-1), minlength=probs.shape[-1]).argmax())


def _edge(x: float) -> float:
    """Fraction 1 for a move <= 0.1, 0 for >= 0.3, linear in between."""
    return float(np.clip((0.3 - x) / 0.2, 0.0, 1.0))


def _action_score(t: SegmentText, d: dict, start: int, frames: slice) -> float | None:
    """Fraction of the named action's conditions met over one segment (module doc)."""
    seg = np.arange(frames.start, frames.stop)
    end = seg[-1]
    cat, mouse = d["cat_xy"], d["mouse_xy"]
    vis, asleep = d["mouse_visible"] > 0.5, d["cat_asleep"] > 0.5
    dcat = cat[end, 0] - cat[start, 0]
    dmouse = mouse[end, 0] - mouse[start, 0]
    sign = {"right": 1, "left": -1}
    a = t.action
    if a is None:
        return None
    if a == "cat_walks":
        checks = [abs(dcat) > 0.1, toon_world.side_word(cat[end, 0]) == t.argument,
                  not asleep[end]]
    elif a == "mouse_runs":
        checks = [vis[end], abs(dmouse) > 0.1, toon_world.side_word(mouse[end, 0]) == t.argument]
    elif a == "cat_chases_mouse":
        s = sign[t.argument]
        checks = [s * dcat > 0.1, s * dmouse > 0.1, vis[end]]
    elif a == "mouse_hides":
        checks = [vis[start], not vis[end]]
    elif a == "mouse_peeks_out":
        checks = [not vis[start], vis[end]]
    elif a == "cat_jumps":
        top = cat[seg, 1].min()
        checks = [top < min(cat[start, 1], cat[end, 1]) - 0.08, sign[t.argument] * dcat > 0.03]
    elif a == "mouse_eats_cheese":
        checks = [vis[end], d["cheese"][start] - d["cheese"][end] > 0.2]
    elif a == "cat_sleeps":
        checks = [not asleep[start], asleep[end]]
    elif a == "cat_waits_by_hole":
        checks = [not vis[seg].any(), min(abs(cat[end, 0] - 0.26), abs(cat[end, 0] - 0.74)) < 0.12,
                  not asleep[end]]
    else:  # mouse_hops
        ys = mouse[seg, 1][vis[seg]]
        checks = [vis[seg].all(), ys.size > 1 and ys.max() - ys.min() > 0.04]
    return float(np.mean(checks))


def _scene_change(d: dict, before: slice, at: slice) -> bool:
    """Do the segments' mean wall, floor or room class probabilities disagree? (Means, not
    single frames: one misread frame must not look like a cut.)"""
    return any(d[k][before].mean(0).argmax() != d[k][at].mean(0).argmax()
               for k in ("wall", "floor", "room"))


def score_detections(d: dict, storyboard: list[dict]) -> dict:
    """Scores detector output `d` (`Detector.detect`) of a video against its storyboard.

    Args:
      d: per-frame detections of a `1 + n F`-frame video.
      storyboard: n segments, each {"text": str, "requires_scene_transition": bool (optional)}.
    Returns:
      {"following": float, "consistency": float, "segments": [per-segment detail],
       "consistency_detail": {...}}, scores in [0, 1].
    """
    n = len(storyboard)
    total = len(d["cat_xy"])
    if n < 1 or (total - 1) % n or total < 1 + n:
        raise ValueError(f"a video of {n} segments needs 1 + {n} F frames (F >= 1 per "
                         f"3-second segment), got {total} frames")
    fps = (total - 1) // n
    flags = [bool(s.get("requires_scene_transition", False)) and i > 0
             for i, s in enumerate(storyboard)]
    segments = []
    for s, entry in enumerate(storyboard):
        t = parse_text(entry["text"])
        frames = slice(1 + s * fps, 1 + (s + 1) * fps)
        start = frames.start - 1
        detail = {"action": t.action}
        terms = []
        action = _action_score(t, d, start, frames)
        if action is not None:
            detail["action_score"] = action
            terms.append(action)
        setting = [t_val == CLASSES[k][_majority(d[k][frames])]
                   for k, t_val in (("room", t.room), ("wall", t.wall), ("floor", t.floor))
                   if t_val is not None]
        if setting:
            detail["setting_score"] = float(np.mean(setting))
            terms.append(detail["setting_score"])
        colours = []
        if t.cat_color is not None:
            colours.append(t.cat_color == CLASSES["cat_color"][_majority(d["cat_color"][frames])])
        seen = d["mouse_visible"][frames] > 0.5
        if t.mouse_color is not None and seen.any():
            colours.append(t.mouse_color ==
                           CLASSES["mouse_color"][_majority(d["mouse_color"][frames][seen])])
        if colours:
            detail["colour_score"] = float(np.mean(colours))
            terms.append(detail["colour_score"])
        if s > 0:
            changed = _scene_change(d, slice(frames.start - fps, frames.start), frames)
            detail["scene_change_detected"] = changed
            detail["scene_score"] = float(changed == flags[s])
            terms.append(detail["scene_score"])
        detail["following"] = float(np.mean(terms)) if terms else 0.0
        segments.append(detail)
    following = float(np.mean([seg["following"] for seg in segments]))

    # consistency
    cat_ids = d["cat_color"].argmax(-1)
    identity = [float(np.mean(cat_ids == np.bincount(cat_ids).argmax()))]
    seen = d["mouse_visible"] > 0.5
    if seen.sum() > 1:
        mouse_ids = d["mouse_color"][seen].argmax(-1)
        identity.append(float(np.mean(mouse_ids == np.bincount(mouse_ids).argmax())))
    scenes, begin = [], 0
    for s in range(1, n + 1):
        if s == n or flags[s]:
            scenes.append((0 if begin == 0 else 1 + begin * fps, 1 + s * fps))
            begin = s
    look = []
    for lo, hi in scenes:
        for k in ("wall", "floor"):
            ids = d[k][lo:hi].argmax(-1)
            look.append(float(np.mean(ids == np.bincount(ids).argmax())))
    continuity = []
    for s in range(1, n):
        if flags[s]:
            continue
        a, b = s * fps, s * fps + 1            # last frame of s - 1, first of s
        moves = [np.hypot(*(d["cat_xy"][b] - d["cat_xy"][a]))]
        if seen[a] and seen[b]:
            moves.append(np.hypot(*(d["mouse_xy"][b] - d["mouse_xy"][a])))
        continuity.append(_edge(max(moves)))
    parts = {"identity": float(np.mean(identity)), "room_look": float(np.mean(look)),
             "continuity": float(np.mean(continuity)) if continuity else 1.0}
    consistency = float(np.mean(list(parts.values())))
    return {"following": round(following, 4), "consistency": round(consistency, 4),
            "segments": segments, "consistency_detail": {k: round(v, 4) for k, v in parts.items()}}


def score_video(frames: np.ndarray, storyboard: list[dict], detector=None) -> dict:
    """`score_detections` of uint8 frames [1 + n F, H, W, 3] read by `detector` (default shipped)."""
    from tttjax.eval.detector import load_detector

    det = detector or load_detector()
    return score_detections(det.detect(frames), storyboard)
