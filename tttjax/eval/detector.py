"""A frame detector for the toon world, trained only on the renderer's ground truth.

    det = load_detector()                       # the weights shipped with tttjax
    out = det.detect(frames)                    # uint8 [F, H, W, 3] -> per-frame numpy dict

Every frame is resized to 64 x 64 (the renderer draws in fractions of the image, so a 128 x
192 frame resized to 64 x 64 looks like a 64 x 64 render) and a small CNN reads:

    cat_xy, mouse_xy   float32 [F, 2]   body centres, normalised (x right, y down), as
                                        `toon_world.State.positions`
    cheese             float32 [F]      amount of cheese left (0 = none)
    mouse_visible      float32 [F]      probability the mouse is visible
    cat_asleep         float32 [F]      probability the cat is asleep
    wall, floor, room, cat_color, mouse_color
                       float32 [F, K]   class probabilities over `CLASSES[name]`

Training data (`python -m tttjax.eval.detector --out DIR`) are frames drawn by
`tttjax.data.toon_render` from random `toon_world` episodes (world seed 7777, so exported
evaluation episodes of other seeds are unseen), labelled with their `State`: 64 x 64
renders, 128 x 192 renders resized, and, when the learned toon codec is present, renders
passed through it (encode + decode) so codec-decoded videos are read as well; plus blur,
noise and MP4-like chroma smearing. Nothing a model generated is ever used.

The shipped weights (`tttjax/eval/detector_weights/`, float16 Orbax) were made by

    python -m tttjax.eval.detector --out tttjax/eval/detector_weights

(defaults: 400 episodes, 1000 steps of 64 frames, seed 0; 30 minutes on the 2-core sandbox at
load average 15-25). Held-out figures (world seed 7778, degraded and codec frames included,
in `detector.json`): cat position error 0.098, mouse 0.148 (image fractions), mouse
visibility 0.82, cat asleep 0.96, wall 1.00, floor 0.99, room kind 0.59, cat colour 0.94,
mouse colour 0.47. A coarse reader: the scores built on it (`tttjax.eval.score`) use
thresholds well above these errors.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.command_line import ArgumentParser, one_line_errors
from tttjax.small_weights import load_weights, save_weights
from tttjax.data import toon_world

CLASSES = {
    "wall": tuple(toon_world.WALL_COLORS),
    "floor": tuple(toon_world.FLOORS),
    "room": tuple(toon_world.ROOM_FURNITURE),
    "cat_color": tuple(toon_world.CAT_COLORS),
    "mouse_color": tuple(toon_world.MOUSE_COLORS),
}
SIZE = 64
TRAIN_WORLD_SEED = 7777
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detector_weights")
_PROG = "python -m tttjax.eval.detector"
_REG = ("cat_x", "cat_y", "mouse_x", "mouse_y", "cheese")
_BIN = ("mouse_visible", "cat_asleep")


class DetectorNet(nnx.Module):
    """float [B, 64, 64, 3] in [-1, 1] -> logits [B, 5 + 2 + sum(class counts)]."""

    def __init__(self, width: int = 24, *, rngs: nnx.Rngs):
        w = width
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.convs = nnx.List([conv(3, w, strides=2), conv(w, 2 * w, strides=2),
                               conv(2 * w, 2 * w), conv(2 * w, 4 * w, strides=2),
                               conv(4 * w, 4 * w, strides=2)])
        outputs = len(_REG) + len(_BIN) + sum(len(c) for c in CLASSES.values())
        self.hidden = nnx.Linear(16 * 4 * w, 128, rngs=rngs)
        self.out = nnx.Linear(128, outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.convs:
            x = jax.nn.silu(layer(x))
        x = x.reshape(x.shape[0], -1)
        return self.out(jax.nn.silu(self.hidden(x)))


def _split(logits: jax.Array) -> dict:
    out, i = {}, 0
    for name in _REG:
        out[name] = logits[:, i]
        i += 1
    for name in _BIN:
        out[name] = logits[:, i]
        i += 1
    for name, classes in CLASSES.items():
        out[name] = logits[:, i:i + len(classes)]
        i += len(classes)
    return out


@nnx.jit
def _forward(net: DetectorNet, x: jax.Array) -> dict:
    raw = _split(net(x))
    out = {name: jax.nn.sigmoid(raw[name]) for name in _REG + _BIN}
    out.update({name: jax.nn.softmax(raw[name], axis=-1) for name in CLASSES})
    return out


def to_input(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [F, 64, 64, 3] in [-1, 1] (area-resized)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] != (SIZE, SIZE):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((SIZE, SIZE), Image.BOX))
                           for f in frames])
    return frames.astype(np.float32) / 127.5 - 1.0


class Detector:
    """A trained `DetectorNet` reading toon frames (module doc)."""

    def __init__(self, net: DetectorNet):
        self.net = net

    def detect(self, frames: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
        """uint8 [F, H, W, 3] -> {name: float32 [F, ...]} (module doc)."""
        x = to_input(frames)
        count = len(x)
        # Fixed-size chunks (the last one zero-padded): one compiled program for any length.
        x = np.concatenate([x, np.zeros((-count % batch, *x.shape[1:]), x.dtype)])
        parts = [jax.tree.map(np.asarray, _forward(self.net, jnp.asarray(x[i:i + batch])))
                 for i in range(0, len(x), batch)]
        out = {k: np.concatenate([p[k] for p in parts])[:count] for k in parts[0]}
        out["cat_xy"] = np.stack([out.pop("cat_x"), out.pop("cat_y")], axis=-1)
        out["mouse_xy"] = np.stack([out.pop("mouse_x"), out.pop("mouse_y")], axis=-1)
        return out


# ------------------------------------------------------------------------------ training data


def state_labels(state: toon_world.State) -> np.ndarray:
    """The training target of one frame: float32 [5 + 2 + 5] (regression, binary, class ids)."""
    (cx, cy), (mx, my) = state.positions()
    room = state.room
    return np.array([cx, cy, mx, my, state.cheese, float(state.mouse_visible),
                     float(state.cat_asleep), CLASSES["wall"].index(room.wall_name),
                     CLASSES["floor"].index(room.floor_name), CLASSES["room"].index(room.kind),
                     CLASSES["cat_color"].index(state.cat_color),
                     CLASSES["mouse_color"].index(state.mouse_color)], np.float32)


def _degrade(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, chroma smearing and noise on float [F, 64, 64, 3] frames (what MP4 and decoders do)."""
    x = frames
    if rng.random() < 0.5:  # 3x3 box blur
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9.0
    if rng.random() < 0.5:  # chroma at half resolution, luma kept (yuv420)
        luma = x.mean(axis=-1, keepdims=True)
        chroma = x - luma
        c = chroma.reshape(-1, SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(2, 4))
        x = luma + np.repeat(np.repeat(c, 2, axis=1), 2, axis=2)
    x = x + rng.normal(0, rng.uniform(0, 0.05), x.shape)
    return np.clip(x, -1, 1).astype(np.float32)


def training_frames(episodes: int, seed: int = TRAIN_WORLD_SEED, codec=None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(frames float32 [N, 64, 64, 3], labels float32 [N, 12]) from `episodes` episodes."""
    from tttjax.data import toon_render

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for index in range(episodes):
        ep = toon_world.make_episode(seed, index, num_segments=3, frames_per_segment=8,
                                     scene_change_prob=0.5)
        states = ep.states()
        kind = rng.random()
        if kind < 0.25:  # small geometry, resized
            frames = to_input(toon_render.render_episode(ep, 128, 192))
        else:
            raw = toon_render.render_episode(ep, SIZE, SIZE)
            if codec is not None and kind < 0.6:
                raw = codec.decode(codec.encode(raw))
            frames = raw.astype(np.float32) / 127.5 - 1.0
        xs.append(_degrade(frames, rng))
        ys.append(np.stack([state_labels(s) for s in states]))
    return np.concatenate(xs), np.concatenate(ys)


def _loss(net: DetectorNet, x: jax.Array, y: jax.Array) -> jax.Array:
    raw = _split(net(x))
    visible = y[:, 5]
    reg = jnp.stack([jax.nn.sigmoid(raw[n]) for n in _REG], axis=-1)
    err = (reg - y[:, :5]) ** 2
    mask = jnp.stack([jnp.ones_like(visible)] * 2 + [visible] * 2 + [jnp.ones_like(visible)], -1)
    loss = 20.0 * jnp.sum(err * mask) / x.shape[0]
    for i, name in enumerate(_BIN):
        loss += jnp.mean(optax_sigmoid_bce(raw[name], y[:, 5 + i]))
    for i, name in enumerate(CLASSES):
        labels = y[:, 7 + i].astype(jnp.int32)
        logp = jax.nn.log_softmax(raw[name], axis=-1)
        loss -= jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
    return loss


def optax_sigmoid_bce(logits, labels):
    import optax

    return optax.sigmoid_binary_cross_entropy(logits, labels)


def train_detector(*, episodes: int = 400, steps: int = 1000, batch: int = 64, lr: float = 2e-3,
                   width: int = 24, seed: int = 0, codec=None, log=print
                   ) -> tuple[Detector, dict]:
    """Trains a `DetectorNet` on rendered frames; returns it and held-out accuracy figures."""
    import optax

    t0 = time.time()
    x_all, y_all = training_frames(episodes, codec=codec)
    x_val, y_val = training_frames(40, seed=TRAIN_WORLD_SEED + 1, codec=codec)
    log(f"rendered {len(x_all)} training frames in {time.time() - t0:.0f} s")
    net = DetectorNet(width, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps,
                                                  lr * 0.05)
    opt = nnx.Optimizer(net, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(net, opt, x, y):
        loss, grads = nnx.value_and_grad(_loss)(net, x, y)
        opt.update(net, grads)
        return loss

    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        idx = rng.integers(0, len(x_all), batch)
        # No mirror augmentation: captions name the sides and directions.
        losses.append(float(step(net, opt, jnp.asarray(x_all[idx]), jnp.asarray(y_all[idx]))))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"step {i + 1}/{steps}  loss {np.mean(losses[-100:]):.4f}  "
                f"({time.time() - t0:.0f} s)")
    det = Detector(net)
    meta = dict(episodes=episodes, steps=steps, batch=batch, lr=lr, seed=seed,
                with_codec=codec is not None, train_seconds=round(time.time() - t0, 1),
                **held_out_accuracy(det, x_val, y_val))
    return det, meta


def held_out_accuracy(det: Detector, x: np.ndarray, y: np.ndarray) -> dict:
    """Mean position errors and class accuracies on float frames `x` with labels `y`."""
    out = jax.tree.map(np.asarray, _forward(det.net, jnp.asarray(x)))
    vis = y[:, 5] > 0.5
    figures = {
        "cat_xy_error": float(np.mean(np.hypot(out["cat_x"] - y[:, 0], out["cat_y"] - y[:, 1]))),
        "mouse_xy_error": float(np.mean(np.hypot(out["mouse_x"][vis] - y[vis, 2],
                                                 out["mouse_y"][vis] - y[vis, 3]))),
        "cheese_error": float(np.mean(np.abs(out["cheese"] - y[:, 4]))),
        "mouse_visible_acc": float(np.mean((out["mouse_visible"] > 0.5) == vis)),
        "cat_asleep_acc": float(np.mean((out["cat_asleep"] > 0.5) == (y[:, 6] > 0.5))),
    }
    for i, name in enumerate(CLASSES):
        figures[f"{name}_acc"] = float(np.mean(out[name].argmax(-1) == y[:, 7 + i]))
    return {k: round(v, 4) for k, v in figures.items()}


# ------------------------------------------------------------------------------ save / load


def save_detector(path: str, det: Detector, meta: dict) -> str:
    """Writes the weights (float16, Orbax) and `detector.json` (width, training figures)."""
    info = dict(width=int(det.net.convs[0].out_features), **meta)
    return save_weights(path, det.net, "detector.json", info)


@functools.lru_cache(maxsize=4)
def load_detector(path: str = DEFAULT_WEIGHTS) -> Detector:
    """The detector saved at `path` (default: the weights shipped with tttjax)."""
    net, _ = load_weights(path, "detector.json",
                          lambda i: DetectorNet(i["width"], rngs=nnx.Rngs(0)),
                          f"it is not a toon detector; train one with `{_PROG} --out DIR`")
    return Detector(net)


@one_line_errors(_PROG)
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description="Train the toon frame detector of "
                            "`python -m tttjax.eval` on rendered ground truth.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the weights + detector.json")
    parser.add_argument("--episodes", type=int, default=400, help="rendered training episodes")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-codec", action="store_true",
                        help="do not add frames passed through the learned toon codec")
    args = parser.parse_args(argv)
    if min(args.episodes, args.steps, args.batch) < 1:
        parser.error("--episodes, --steps and --batch must be >= 1")
    codec = None
    if not args.no_codec:
        from tttjax.data.toon_codec import load_codec

        codec = load_codec()
    det, meta = train_detector(episodes=args.episodes, steps=args.steps, batch=args.batch,
                               seed=args.seed, codec=codec)
    path = save_detector(args.out, det, meta)
    print(f"wrote {path}: {json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
