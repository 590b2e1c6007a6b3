"""The toon world: a procedural cartoon of a cat, a mouse and a piece of cheese in rooms.

An *episode* is a short cartoon cut into 3-second segments. Every segment plays exactly one
action of a small grammar and comes with a 3-5 sentence caption (action first, then the
setting, then details), in the spirit of the paper's storyboard "Format 3":

    cat_walks  mouse_runs  cat_chases_mouse  mouse_hides  mouse_peeks_out  cat_jumps
    mouse_eats_cheese  cat_sleeps  cat_waits_by_hole  mouse_hops

Actions have preconditions on the world state (a hidden mouse cannot run, only a visible mouse
can eat the cheese, ...) and change it. A segment may start a new scene: another room with its
own walls, floor, furniture, mouse hole and cheese, and the characters placed afresh.

Everything is a pure function of `(seed, index)`, so an episode can be regenerated anywhere.
Frame `0` shows the state before segment 0; segment `s` owns frames
`1 + s * F ... (s + 1) * F` (F frames per segment), its last frame showing the action done,
which is the CogVideoX `1 + 48 n` frame layout for F = 48.

Coordinates are normalised image coordinates: x from 0 (left) to 1 (right), y from 0 (top) to
1 (bottom). The per-frame positions stored with the dataset are the body centres of the cat
and the mouse, with a visibility flag (the mouse is invisible while hidden in its hole).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

CHARACTERS = ("cat", "mouse")
GROUND_Y = 0.86          # y of the characters' feet
FLOOR_Y = 0.58           # where the wall meets the floor
CAT_SIZE = (0.24, 0.15)  # body width, height (fractions of the image)
MOUSE_SIZE = (0.10, 0.06)

ROOM_FURNITURE = {
    "kitchen": ("table", "window", "stove", "cupboard"),
    "living room": ("sofa", "window", "lamp", "rug"),
    "bedroom": ("bed", "lamp", "window", "rug"),
    "cellar": ("barrel", "crate", "shelf"),
    "hallway": ("door", "rug", "lamp", "shelf"),
}
WALL_COLORS = {
    "yellow": (232, 208, 120), "blue": (140, 172, 222), "pink": (230, 172, 190),
    "green": (164, 204, 150), "gray": (176, 176, 180), "purple": (176, 150, 210),
}
FLOORS = {
    "wooden floor": (150, 100, 58), "red tiled floor": (172, 74, 62),
    "gray stone floor": (104, 104, 110), "green carpet": (66, 128, 80),
}
CAT_COLORS = {"orange": (236, 140, 40), "black": (36, 36, 40), "gray": (112, 112, 124),
              "white": (248, 248, 244)}
MOUSE_COLORS = {"brown": (128, 88, 58), "gray": (150, 150, 150), "white": (250, 250, 250)}
ACTIONS = ("cat_walks", "mouse_runs", "cat_chases_mouse", "mouse_hides", "mouse_peeks_out",
           "cat_jumps", "mouse_eats_cheese", "cat_sleeps", "cat_waits_by_hole", "mouse_hops")


@dataclasses.dataclass(frozen=True)
class Room:
    """A scene: one room seen from the front, the camera does not move."""

    kind: str
    wall_name: str
    floor_name: str
    furniture: tuple[tuple[str, float], ...]   # (kind, x centre)
    hole_x: float                              # mouse hole at the foot of the wall

    @property
    def wall(self) -> tuple[int, int, int]:
        return WALL_COLORS[self.wall_name]

    @property
    def floor(self) -> tuple[int, int, int]:
        return FLOORS[self.floor_name]


@dataclasses.dataclass(frozen=True)
class State:
    """The world at one frame."""

    room: Room
    cat_color: str
    mouse_color: str
    cat_x: float
    cat_jump: float = 0.0          # height above the ground (fraction of the image)
    cat_facing: int = 1            # +1 right, -1 left
    cat_asleep: bool = False
    mouse_x: float = 0.5
    mouse_jump: float = 0.0
    mouse_facing: int = -1
    mouse_visible: bool = True
    cheese_x: float = 0.5
    cheese: float = 0.0            # amount left, 0 = no cheese

    def positions(self) -> np.ndarray:
        """[2, 2] body centres (x, y) of the cat and the mouse."""
        cat_y = GROUND_Y - CAT_SIZE[1] / 2 - self.cat_jump
        mouse_y = GROUND_Y - MOUSE_SIZE[1] / 2 - self.mouse_jump
        return np.array([[self.cat_x, cat_y], [self.mouse_x, mouse_y]], np.float32)

    def visible(self) -> np.ndarray:
        return np.array([True, self.mouse_visible])


@dataclasses.dataclass(frozen=True)
class Segment:
    """One 3-second segment: its action, its caption and its frames."""

    action: str
    caption: str
    scene_start: bool
    frames: tuple[State, ...]     # F states, the last one is the action completed


@dataclasses.dataclass(frozen=True)
class Episode:
    first: State                  # frame 0
    segments: tuple[Segment, ...]

    def states(self) -> list[State]:
        """All 1 + n * F frame states in order."""
        out = [self.first]
        for seg in self.segments:
            out.extend(seg.frames)
        return out

    @property
    def scene_start(self) -> np.ndarray:
        return np.array([s.scene_start for s in self.segments])

    @property
    def scene_end(self) -> np.ndarray:
        """True where the next segment starts a new scene (or the episode ends)."""
        starts = [s.scene_start for s in self.segments[1:]] + [True]
        return np.array(starts)


# ------------------------------------------------------------------------------ words


def side_word(x: float) -> str:
    return "left side" if x < 0.36 else ("right side" if x > 0.64 else "middle")


def place_words(x: float) -> str:
    side = side_word(x)
    return "in the middle" if side == "middle" else f"on the {side}"


def _direction_word(dx: float) -> str:
    return "to the right" if dx > 0 else "to the left"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# ------------------------------------------------------------------------------ scenes


def _new_room(rng: np.random.Generator, avoid: Room | None = None) -> Room:
    kinds = [k for k in ROOM_FURNITURE if avoid is None or k != avoid.kind]
    kind = kinds[rng.integers(len(kinds))]
    items = ROOM_FURNITURE[kind]
    count = int(rng.integers(1, 3))
    chosen = rng.choice(len(items), size=count, replace=False)
    slots = rng.permutation([0.2, 0.5, 0.8])[:count]
    furniture = tuple((items[i], float(x)) for i, x in zip(sorted(chosen), slots))
    return Room(kind=kind,
                wall_name=list(WALL_COLORS)[rng.integers(len(WALL_COLORS))],
                floor_name=list(FLOORS)[rng.integers(len(FLOORS))],
                furniture=furniture,
                hole_x=float(rng.choice([0.1, 0.9]) + rng.uniform(-0.03, 0.03)))


def _new_scene(rng: np.random.Generator, room: Room, cat_color: str, mouse_color: str) -> State:
    cat_x = float(rng.uniform(0.2, 0.8))
    mouse_x = float(np.clip(cat_x + rng.choice([-1, 1]) * rng.uniform(0.3, 0.5), 0.08, 0.92))
    has_cheese = rng.random() < 0.7
    cheese_x = float(rng.uniform(0.15, 0.85))
    return State(room=room, cat_color=cat_color, mouse_color=mouse_color, cat_x=cat_x,
                 cat_facing=1 if mouse_x > cat_x else -1, mouse_x=mouse_x,
                 mouse_facing=1 if rng.random() < 0.5 else -1,
                 mouse_visible=bool(rng.random() < 0.8), cheese_x=cheese_x,
                 cheese=1.0 if has_cheese else 0.0)


# ------------------------------------------------------------------------------ actions

# An action returns (action sentence, frame function p -> State for p in (0, 1]).
Plan = tuple[str, Callable[[float], State]]


def _ease(p: float) -> float:
    return p * p * (3 - 2 * p)


def _lerp(a: float, b: float, p: float) -> float:
    return a + (b - a) * _ease(p)


def _far_target(rng, x: float, lo=0.1, hi=0.9, min_dist=0.25) -> float:
    for _ in range(32):
        t = float(rng.uniform(lo, hi))
        if abs(t - x) >= min_dist:
            return t
    return hi if x < 0.5 else lo


def _cat_walks(s: State, rng) -> Plan:
    target = _far_target(rng, s.cat_x)
    facing = 1 if target > s.cat_x else -1
    manner = ["slowly", "lazily", "proudly", "quietly"][rng.integers(4)]
    text = f"The {s.cat_color} cat walks {manner} over to the {side_word(target)} of the {s.room.kind}."
    return text, lambda p: dataclasses.replace(
        s, cat_x=_lerp(s.cat_x, target, p), cat_facing=facing, cat_asleep=False)


def _mouse_runs(s: State, rng) -> Plan:
    target = _far_target(rng, s.mouse_x)
    facing = 1 if target > s.mouse_x else -1
    text = (f"The little {s.mouse_color} mouse scurries over to the {side_word(target)} of the "
            f"{s.room.kind}.")
    return text, lambda p: dataclasses.replace(s, mouse_x=_lerp(s.mouse_x, target, p),
                                               mouse_facing=facing)


def _cat_chases_mouse(s: State, rng) -> Plan:
    away = 1 if s.mouse_x >= s.cat_x else -1
    mouse_to = 0.9 if away > 0 else 0.1
    if abs(mouse_to - s.mouse_x) < 0.15:  # cornered: the mouse slips past the cat
        away, mouse_to = -away, 0.9 if away < 0 else 0.1
    cat_to = float(np.clip(mouse_to - away * 0.22, 0.1, 0.9))
    text = (f"The {s.cat_color} cat chases the {s.mouse_color} mouse across the {s.room.kind} "
            f"{_direction_word(away)}.")

    def frame(p):
        # The cat starts a beat later and never quite catches up.
        return dataclasses.replace(
            s, mouse_x=_lerp(s.mouse_x, mouse_to, p), mouse_facing=away,
            cat_x=_lerp(s.cat_x, cat_to, max(0.0, (p - 0.15) / 0.85)), cat_facing=away,
            cat_asleep=False)
    return text, frame


def _mouse_hides(s: State, rng) -> Plan:
    facing = 1 if s.room.hole_x > s.mouse_x else -1
    text = f"The {s.mouse_color} mouse darts into the mouse hole in the wall and hides."

    def frame(p):
        q = min(1.0, p / 0.8)
        return dataclasses.replace(s, mouse_x=_lerp(s.mouse_x, s.room.hole_x, q),
                                   mouse_facing=facing, mouse_visible=p < 0.8)
    return text, frame


def _mouse_peeks_out(s: State, rng) -> Plan:
    inward = 1 if s.room.hole_x < 0.5 else -1
    target = s.room.hole_x + inward * float(rng.uniform(0.12, 0.25))
    text = f"The {s.mouse_color} mouse peeks out of its hole and steps into the {s.room.kind}."

    def frame(p):
        q = max(0.0, (p - 0.25) / 0.75)
        return dataclasses.replace(s, mouse_x=_lerp(s.room.hole_x, target, q),
                                   mouse_facing=inward, mouse_visible=p >= 0.25)
    return text, frame


def _cat_jumps(s: State, rng) -> Plan:
    dx = float(rng.choice([-1, 1]) * rng.uniform(0.1, 0.2))
    target = float(np.clip(s.cat_x + dx, 0.1, 0.9))
    facing = 1 if target > s.cat_x else -1
    text = f"The {s.cat_color} cat jumps high into the air and lands {_direction_word(dx)}."
    return text, lambda p: dataclasses.replace(
        s, cat_x=s.cat_x + (target - s.cat_x) * p, cat_jump=0.3 * 4 * p * (1 - p),
        cat_facing=facing, cat_asleep=False)


def _mouse_eats_cheese(s: State, rng) -> Plan:
    stand = s.cheese_x - 0.06 if s.mouse_x < s.cheese_x else s.cheese_x + 0.06
    facing = 1 if s.cheese_x > stand else -1
    left = max(0.0, s.cheese - 0.5)
    end = "and eats it all up" if left == 0 else "and nibbles half of it"
    text = f"The {s.mouse_color} mouse runs to the piece of cheese {end}."

    def frame(p):
        walk = min(1.0, p / 0.5)
        eat = max(0.0, (p - 0.5) / 0.5)
        return dataclasses.replace(s, mouse_x=_lerp(s.mouse_x, stand, walk), mouse_facing=facing,
                                   cheese=s.cheese + (left - s.cheese) * eat)
    return text, frame


def _cat_sleeps(s: State, rng) -> Plan:
    text = f"The {s.cat_color} cat curls up on the floor and falls asleep."
    return text, lambda p: dataclasses.replace(s, cat_asleep=p >= 0.3)


def _cat_waits_by_hole(s: State, rng) -> Plan:
    inward = 1 if s.room.hole_x < 0.5 else -1
    target = s.room.hole_x + inward * 0.16
    text = (f"The {s.cat_color} cat walks to the mouse hole and waits for the mouse to come out.")
    return text, lambda p: dataclasses.replace(
        s, cat_x=_lerp(s.cat_x, target, min(1.0, p / 0.7)), cat_facing=-inward, cat_asleep=False)


def _mouse_hops(s: State, rng) -> Plan:
    text = f"The {s.mouse_color} mouse hops up and down happily."
    return text, lambda p: dataclasses.replace(
        s, mouse_jump=0.12 * abs(np.sin(2 * np.pi * p)))


_ACTION_FNS = {
    "cat_walks": (_cat_walks, lambda s: True),
    "mouse_runs": (_mouse_runs, lambda s: s.mouse_visible),
    "cat_chases_mouse": (_cat_chases_mouse, lambda s: s.mouse_visible),
    "mouse_hides": (_mouse_hides, lambda s: s.mouse_visible),
    "mouse_peeks_out": (_mouse_peeks_out, lambda s: not s.mouse_visible),
    "cat_jumps": (_cat_jumps, lambda s: True),
    "mouse_eats_cheese": (_mouse_eats_cheese, lambda s: s.mouse_visible and s.cheese > 0),
    "cat_sleeps": (_cat_sleeps, lambda s: not s.cat_asleep),
    "cat_waits_by_hole": (_cat_waits_by_hole, lambda s: not s.mouse_visible),
    "mouse_hops": (_mouse_hops, lambda s: s.mouse_visible),
}
assert tuple(_ACTION_FNS) == ACTIONS


def applicable_actions(state: State) -> list[str]:
    """Actions whose preconditions hold in `state`, in `ACTIONS` order."""
    return [name for name, (_, ok) in _ACTION_FNS.items() if ok(state)]


# ------------------------------------------------------------------------------ captions


def _setting_sentence(room: Room) -> str:
    things = [_a(room.floor_name)] + [_a(kind) for kind, _ in room.furniture]
    listed = ", ".join(things[:-1]) + " and " + things[-1]
    return f"The {room.kind} has {room.wall_name} walls, {listed}."


def _detail_sentences(start: State, end: State) -> list[str]:
    room = end.room
    out = [f"A small mouse hole is in the wall {place_words(room.hole_x)}."]
    if end.cheese > 0:
        out.append(f"A yellow piece of cheese lies on the floor {place_words(end.cheese_x)}.")
    mouse = ("the mouse is hidden in its hole" if not end.mouse_visible
             else f"the mouse is {place_words(end.mouse_x)}")
    cat = "asleep" if end.cat_asleep else place_words(end.cat_x)
    out.append(f"At the end the cat is {cat} and {mouse}.")
    out.append("The camera does not move.")
    return out


def _caption(action_text: str, start: State, end: State, rng: np.random.Generator) -> str:
    details = _detail_sentences(start, end)
    keep = int(rng.integers(1, 4))  # 3 to 5 sentences: action, setting, 1-3 details
    chosen = sorted(rng.choice(len(details), size=min(keep, len(details)), replace=False))
    return " ".join([action_text, _setting_sentence(end.room)] + [details[i] for i in chosen])


# ------------------------------------------------------------------------------ episodes


def make_episode(seed: int, index: int, *, num_segments: int, frames_per_segment: int,
                 scene_change_prob: float = 0.3) -> Episode:
    """The episode `index` of the world `seed` (pure function of its arguments)."""
    if num_segments < 1 or frames_per_segment < 1:
        raise ValueError(f"need num_segments >= 1 and frames_per_segment >= 1, got "
                         f"{num_segments}, {frames_per_segment}")
    rng = np.random.default_rng([seed, index])
    cat_color = list(CAT_COLORS)[rng.integers(len(CAT_COLORS))]
    mouse_color = list(MOUSE_COLORS)[rng.integers(len(MOUSE_COLORS))]
    state = _new_scene(rng, _new_room(rng), cat_color, mouse_color)
    first = state
    segments = []
    for s in range(num_segments):
        scene_start = s == 0
        if s > 0 and rng.random() < scene_change_prob:
            state = _new_scene(rng, _new_room(rng, avoid=state.room), cat_color, mouse_color)
            scene_start = True
        names = applicable_actions(state)
        action = names[rng.integers(len(names))]
        text, frame_fn = _ACTION_FNS[action][0](state, rng)
        frames = tuple(frame_fn((f + 1) / frames_per_segment) for f in range(frames_per_segment))
        # A new scene cuts straight into the action: the cut happens between frames.
        end = dataclasses.replace(frames[-1], cat_jump=0.0, mouse_jump=0.0)
        segments.append(Segment(action=action, caption=_caption(text, state, end, rng),
                                scene_start=scene_start, frames=frames))
        state = end
    return Episode(first=first, segments=tuple(segments))


def episode_segments(seed: int, index: int, min_segments: int, max_segments: int) -> int:
    """Number of segments of episode `index`: uniform in [min_segments, max_segments]."""
    rng = np.random.default_rng([seed, index, 1])
    return int(rng.integers(min_segments, max_segments + 1))
