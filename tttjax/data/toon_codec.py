"""A learned latent codec for the toon world: a small convolutional autoencoder in Flax NNX.

It has the CogVideoX latent geometry of the fixed linear codec (`tttjax.data.toy_latents`):
4x in time, 8x in space, C channels (4 for `configs/tiny.py`), so the DiT configs are
unchanged, but where the linear map keeps one colour per 4 x 8 x 8 block, the autoencoder
learns to put the cat, the mouse and the cheese into the latents and draw them back:

    encode:  frames uint8 [F = 1 + 4k, H, W, 3]  ->  latents float32 [1 + k, C, H/8, W/8]
      latent frame 0 codes frame 0 alone (as a group of 4 copies of it), latent frame j >= 1
      codes frames 4j-3 .. 4j (CogVideoX's causal grouping); the 4 frames of a group are
      stacked as 12 input channels, then a 2x space-to-depth and 2 stride-2 convolutions
      reach 1/8 of the size, where a residual block ends the encoder.
      Latents are standardised per channel (mean and standard deviation measured on the
      training frames, stored with the weights), so diffusion sees zero-mean, unit-variance
      latents.
    decode:  latents [T, C, h, w] -> uint8 frames [1 + 4(T - 1), 8h, 8w, 3]
      (a residual block at 1/8, then twice: nearest-neighbour upsampling, a convolution and a
      residual block; frame 0 is the last frame of group 0).

Trained here, on CPU, on frames drawn by `tttjax.data.toon_render` from `tttjax.data.toon_world`
episodes (not from any dataset on disk): 64 x 64 frames, and 64 x 64 crops of 128 x 192 ones
so the `small` geometry decodes too (the network is fully convolutional). The loss is the
pixel L1 error, weighted up where a character or the cheese is drawn (the renderer's empty
room is the reference), with Gaussian noise added to the latents so the decoder tolerates the
imperfect latents a diffusion model samples.

The weights shipped in `tttjax/data/toon_codec_weights/` (Orbax, float16, network layout
`LAYOUT`) were made by

    python -m tttjax.data.toon_codec --out W
    python -m tttjax.data.toon_codec --decoder-of W --out tttjax/data/toon_codec_weights \
        --steps 12000 --lr 1e-3 --refresh-every 2000 --seed 1

(first defaults: --width 22 --steps 8000 --batch 16 --groups 6000 --seed 0), and the README's
round-trip picture by `python -m tttjax.data.toon_codec --sheet docs/demo/toon_codec.png`.
`--decoder-of W` retrains only the decoder of the codec at W: the encoder, and so the
latents every DiT (the shipped toon base included) was trained on, stay bit for bit the
same, so a better decoder never forces retraining the models; `--refresh-every N` renders
new training frames every N steps (6000 groups seen ~20 times each overfit: the first
step's held-out error is above its training loss).
Figures (parameters, size, time, error) are in the README, section "Data".
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.command_line import ArgumentParser, UsageError, one_line_errors
from tttjax.data.toy_latents import FrameCodec
from tttjax.small_weights import load_weights, save_weights

TEMPORAL, SPATIAL = 4, 8
# 2: residual blocks in the encoder and at each decoder resolution (1: plain convolutions).
LAYOUT = 2
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toon_codec_weights")
_PROG = "python -m tttjax.data.toon_codec"


class _Residual(nnx.Module):
    """x + conv(silu(conv(silu(x)))): depth at one resolution without losing the input."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.inner = conv(channels, channels)
        self.outer = conv(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.outer(jax.nn.silu(self.inner(jax.nn.silu(x))))


def _upsample(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")


class ToonCodecNet(nnx.Module):
    """The autoencoder: groups of 4 frames [B, H, W, 12] <-> raw latents [B, H/8, W/8, C].

    Pixels enter and leave through a 2x space-to-depth / depth-to-space, so no convolution
    runs at full resolution (a CPU trains it in minutes). The decoder has a residual block
    at each of its three resolutions (1/8, 1/4, 1/2): with plain convolutions the characters
    come back as blobs, because the last layer alone would have to draw their outlines.
    """

    def __init__(self, channels: int = 4, width: int = 22, *, rngs: nnx.Rngs):
        w = width
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.enc = nnx.List([conv(12 * TEMPORAL, w), conv(w, 2 * w, strides=2),
                             conv(2 * w, 2 * w, strides=2)])
        self.enc_res = _Residual(2 * w, rngs=rngs)
        self.to_latent = nnx.Conv(2 * w, channels, kernel_size=(1, 1), rngs=rngs)
        self.from_latent = conv(channels, 2 * w)
        self.dec = nnx.List([conv(2 * w, 2 * w), conv(2 * w, w)])     # after each upsampling
        self.dec_res = nnx.List([_Residual(2 * w, rngs=rngs), _Residual(2 * w, rngs=rngs),
                                 _Residual(w, rngs=rngs)])
        self.to_pixels = conv(w, 12 * TEMPORAL)

    def encode(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, h // 2, w // 2, 4 * c)                    # space-to-depth 2x
        x = jax.nn.silu(self.enc[0](x))
        x = jax.nn.silu(self.enc[1](x))
        x = self.enc_res(self.enc[2](x))                           # 1/8 size
        return self.to_latent(jax.nn.silu(x))

    def decode(self, z: jax.Array) -> jax.Array:
        x = self.dec_res[0](self.from_latent(z))                   # 1/8 size
        for conv, res in zip(self.dec, self.dec_res[1:]):          # 1/4, then 1/2 size
            x = res(conv(jax.nn.silu(_upsample(x))))
        x = self.to_pixels(jax.nn.silu(x))
        b, h, w, c = x.shape
        x = x.reshape(b, h, w, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, 2 * h, 2 * w, c // 4)                  # depth-to-space 2x


# ------------------------------------------------------------------------------ geometry


def _groups(frames: np.ndarray) -> np.ndarray:
    """float [F = 1 + 4k, H, W, 3] -> [1 + k, H, W, 12]: frame 0 alone (4 copies), then by 4."""
    first = np.repeat(frames[:1], TEMPORAL, axis=0)[None]
    rest = frames[1:].reshape(-1, TEMPORAL, *frames.shape[1:])
    g = np.concatenate([first, rest], axis=0)                  # [T, 4, H, W, 3]
    t, _, h, w, _ = g.shape
    return g.transpose(0, 2, 3, 1, 4).reshape(t, h, w, 3 * TEMPORAL)


def _ungroup(groups: np.ndarray) -> np.ndarray:
    """[T, H, W, 12] -> [1 + 4(T - 1), H, W, 3]: group 0's last frame, then every frame."""
    t, h, w, _ = groups.shape
    g = groups.reshape(t, h, w, TEMPORAL, 3).transpose(0, 3, 1, 2, 4)
    return np.concatenate([g[0, -1:], g[1:].reshape(-1, h, w, 3)], axis=0)


@nnx.jit
def _encode(net: ToonCodecNet, x: jax.Array) -> jax.Array:
    return net.encode(x)


@nnx.jit
def _decode(net: ToonCodecNet, z: jax.Array) -> jax.Array:
    return net.decode(z)


class LearnedToonCodec(FrameCodec):
    """Toon frames <-> standardised latents with a trained `ToonCodecNet` (module doc).

    Same interface as `tttjax.data.toy_latents.ToyLatentCodec`: `encode`, `decode`,
    `decode_float`, `latent_frames`, `video_frames`, `channels`, `temporal`, `spatial`.
    """

    temporal, spatial = TEMPORAL, SPATIAL

    def __init__(self, net: ToonCodecNet, shift: np.ndarray, scale: np.ndarray):
        self.net = net
        self.shift = np.asarray(shift, np.float32)             # [C] raw latent mean
        self.scale = np.asarray(scale, np.float32)             # [C] raw latent std
        self.channels = int(self.shift.shape[0])

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames [F, H, W, 3] (uint8, or float in [-1, 1]) -> latents float32 [T, C, h, w]."""
        x = self.unit_frames(frames)
        z = np.asarray(_encode(self.net, jnp.asarray(_groups(x))))     # [T, h, w, C]
        z = (z - self.shift) / self.scale
        return np.ascontiguousarray(z.transpose(0, 3, 1, 2), np.float32)

    def decode_float(self, latents: np.ndarray) -> np.ndarray:
        """latents [T, C, h, w] -> frames float32 [1 + 4(T-1), 8h, 8w, 3] in about [-1, 1]."""
        z = np.asarray(latents, np.float32)
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"latents must be [T, {self.channels}, h, w], got shape {z.shape}")
        z = z.transpose(0, 2, 3, 1) * self.scale + self.shift
        return _ungroup(np.asarray(_decode(self.net, jnp.asarray(z)), np.float32))


# ------------------------------------------------------------------------------ save / load


def save_codec(path: str, codec: LearnedToonCodec, meta: dict) -> str:
    """Writes the weights (float16, Orbax) and `codec.json` (shapes, latent statistics, meta)."""
    width = int(codec.net.enc[0].out_features)
    info = dict(layout=LAYOUT, channels=codec.channels, width=width,
                shift=codec.shift.tolist(), scale=codec.scale.tolist(), **meta)
    return save_weights(path, codec.net, "codec.json", info)


@functools.lru_cache(maxsize=4)
def load_codec(path: str = DEFAULT_WEIGHTS) -> LearnedToonCodec:
    """The codec saved at `path` (default: the weights shipped with tttjax)."""
    def make_net(info):
        if info.get("layout", 1) != LAYOUT:
            raise ValueError(f"the toon codec at {path} has network layout "
                             f"{info.get('layout', 1)}, this tttjax reads layout {LAYOUT}; "
                             f"retrain it with `{_PROG} --out DIR`")
        return ToonCodecNet(info["channels"], info["width"], rngs=nnx.Rngs(0))

    net, info = load_weights(path, "codec.json", make_net,
                             f"it is not a toon codec; train one with `{_PROG} --out DIR`")
    return LearnedToonCodec(net, np.array(info["shift"]), np.array(info["scale"]))


def codec_for_channels(channels: int, path: str = DEFAULT_WEIGHTS) -> LearnedToonCodec:
    """`load_codec(path)`, checked to have `channels` latent channels."""
    codec = load_codec(path)
    if codec.channels != channels:
        raise ValueError(f"the toon codec at {path} has {codec.channels} latent channels, the "
                         f"model {channels}; train one with `{_PROG} --channels {channels}`")
    return codec


# ------------------------------------------------------------------------------ training data


def training_groups(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` 64 x 64 groups of 4 frames and their loss weights, rendered from the world.

    Returns (frames float32 [count, 64, 64, 12] in [-1, 1], weights float32 [count, 64, 64, 12]):
    3/4 of the groups are 64 x 64 renders, 1/4 are 64 x 64 crops of 128 x 192 renders; one in
    8 is a still (4 copies of one frame, as latent frame 0 is). Weights are 1 on the empty
    room and 8 where the characters or the cheese differ from it.
    """
    from tttjax.data import toon_render, toon_world

    rng = np.random.default_rng(seed)
    xs, ws = [], []
    index = 0
    while len(xs) < count:
        small = rng.random() < 0.25
        h, w = (128, 192) if small else (64, 64)
        ep = toon_world.make_episode(seed, index, num_segments=3, frames_per_segment=8)
        index += 1
        states = ep.states()
        for start in range(1, len(states), TEMPORAL):
            if len(xs) >= count:
                break
            group = states[start:start + TEMPORAL]
            if rng.random() < 0.125:
                group = [group[int(rng.integers(TEMPORAL))]] * TEMPORAL
            frames = np.stack([toon_render.render_state(s, h, w) for s in group])
            backs = np.stack([np.asarray(toon_render._background(s.room, h, w)) for s in group])
            if small:
                y0 = 8 * int(rng.integers(0, (h - 64) // 8 + 1))
                x0 = 8 * int(rng.integers(0, (w - 64) // 8 + 1))
                frames = frames[:, y0:y0 + 64, x0:x0 + 64]
                backs = backs[:, y0:y0 + 64, x0:x0 + 64]
            weight = 1.0 + 7.0 * np.any(frames != backs, axis=-1, keepdims=True)
            weight = np.broadcast_to(weight, frames.shape)
            xs.append(frames.transpose(1, 2, 0, 3).reshape(64, 64, 12))
            ws.append(weight.transpose(1, 2, 0, 3).reshape(64, 64, 12))
    x = np.stack(xs).astype(np.float32) / 127.5 - 1.0
    return x, np.stack(ws).astype(np.float32)


# The decoder's parameters: what `train_codec(start=...)` retrains while the encoder, and so
# every latent a DiT was trained on, stays exactly as it was.
DECODER_PARTS = ("from_latent", "dec", "dec_res", "to_pixels")


def train_codec(*, channels: int = 4, width: int = 22, steps: int = 8000, batch: int = 16,
                groups: int = 6000, lr: float = 2e-3, latent_noise: float = 0.1, seed: int = 0,
                start: LearnedToonCodec | None = None, refresh_every: int = 0,
                log=print) -> tuple[LearnedToonCodec, dict]:
    """Trains a `ToonCodecNet` (AdamW, cosine schedule); returns the codec and its figures.

    `start`: retrain only the decoder of this codec (its encoder and latent statistics are
    kept bit for bit, so a DiT trained on its latents stays valid; `channels` and `width` are
    its own). `refresh_every` > 0 renders `groups` new groups (world seeds seed + 1, + 2, ...)
    every that many steps, so the network sees fresh frames instead of repeating 6000.
    """
    import optax

    t0 = time.time()
    x_all, w_all = training_groups(groups, seed)
    log(f"rendered {len(x_all)} training groups in {time.time() - t0:.0f} s")
    if start is None:
        net = ToonCodecNet(channels, width, rngs=nnx.Rngs(seed))
        trained = nnx.Param
    else:
        net = nnx.clone(start.net)
        channels, width = start.channels, int(net.enc[0].out_features)
        trained = nnx.All(nnx.Param, lambda path, _: path[0] in DECODER_PARTS)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps,
                                                  lr * 0.05)
    opt = nnx.Optimizer(net, optax.adamw(schedule, weight_decay=1e-5), wrt=trained)

    def loss_fn(net, x, w, key):
        z = net.encode(x)
        # Noise relative to the latents' own spread: the decoder must tolerate sampled latents.
        spread = jnp.std(z, axis=(0, 1, 2), keepdims=True) + 1e-3
        z = z + latent_noise * spread * jax.random.normal(key, z.shape)
        err = jnp.abs(net.decode(z) - x)
        return jnp.sum(w * err) / jnp.sum(w)

    @nnx.jit
    def step(net, opt, x, w, key):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trained))(
            net, x, w, key)
        opt.update(net, grads)
        return loss

    rng = np.random.default_rng(seed + 1)
    key = jax.random.key(seed)
    losses = []
    for i in range(steps):
        if refresh_every and i and i % refresh_every == 0:
            x_all, w_all = training_groups(groups, seed + i // refresh_every)
        idx = rng.integers(0, len(x_all), batch)
        key, sub = jax.random.split(key)
        losses.append(float(step(net, opt, jnp.asarray(x_all[idx]), jnp.asarray(w_all[idx]), sub)))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"step {i + 1}/{steps}  weighted L1 {np.mean(losses[-100:]):.4f}  "
                f"({time.time() - t0:.0f} s)")
    if start is None:
        z = np.concatenate([np.asarray(_encode(net, jnp.asarray(x_all[i:i + 256])))
                            for i in range(0, len(x_all), 256)])
        shift = z.mean(axis=(0, 1, 2))
        scale = z.std(axis=(0, 1, 2)) + 1e-6
    else:
        shift, scale = start.shift, start.scale
    meta = dict(steps=steps, batch=batch, groups=groups, lr=lr, latent_noise=latent_noise,
                seed=seed, final_weighted_l1=float(np.mean(losses[-100:])),
                train_seconds=round(time.time() - t0, 1))
    if refresh_every:
        meta["refresh_every"] = refresh_every
    return LearnedToonCodec(net, shift, scale), meta


def held_out_error(codec: LearnedToonCodec, groups: int = 256, seed: int = 99) -> dict:
    """The codec's round-trip error on `groups` groups of world `seed` (training uses seed 0).

    Returns {"weighted_l1": the training loss's weighting without latent noise,
    "character_l1": mean L1 on the pixels where a character or the cheese is drawn}, both in
    [-1, 1] pixel units (so 2 is the largest error).
    """
    x, w = training_groups(groups, seed)
    recon = np.concatenate([np.asarray(_decode(codec.net, _encode(codec.net, jnp.asarray(part))))
                            for part in np.split(x, range(64, len(x), 64))])
    err = np.abs(recon - x)
    return dict(weighted_l1=round(float((w * err).sum() / w.sum()), 4),
                character_l1=round(float(err[w > 1].mean()), 4))


def round_trip_sheet(codec: LearnedToonCodec, path: str, *, episodes: int = 2, seed: int = 99,
                     scale: int = 3) -> str:
    """Writes a PNG of held-out toon frames: rendered, through `codec`, through the linear map.

    `episodes` 2-segment episodes of world `seed` (not the training seed 0) at 64 x 64, five
    frames each, one row per version, enlarged `scale` times (nearest neighbour). Returns
    the absolute path.
    """
    from PIL import Image, ImageDraw

    from tttjax.data import toon_render, toon_world
    from tttjax.data.toy_latents import ToyLatentCodec
    from tttjax.video_io import caption_font

    linear = ToyLatentCodec(codec.channels)
    picks = [2, 5, 9, 13, 16]
    rows, labels = [], []
    for index in range(episodes):
        ep = toon_world.make_episode(seed, index, num_segments=2, frames_per_segment=8)
        frames = toon_render.render_episode(ep, 64, 64)
        for label, video in (("rendered", frames), ("learned codec", codec.decode(codec.encode(
                frames))), ("linear codec", linear.decode(linear.encode(frames)))):
            rows.append(np.concatenate([video[i] for i in picks], axis=1))
            labels.append(label)
    grid = np.concatenate(rows, axis=0)
    big = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                       Image.NEAREST)
    margin = 44 * scale
    sheet = Image.new("RGB", (big.width + margin, big.height), (255, 255, 255))
    sheet.paste(big, (margin, 0))
    draw, font = ImageDraw.Draw(sheet), caption_font(4 * scale)
    for i, label in enumerate(labels):
        draw.text((2 * scale, (64 * i + 30) * scale), label, fill=(0, 0, 0), font=font)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path)
    return path


@one_line_errors(_PROG)
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="train a codec into this folder (Orbax weights + codec.json)")
    parser.add_argument("--sheet", help="write a PNG of held-out frames: rendered, through the "
                                        "codec, through the linear map")
    parser.add_argument("--held-out", action="store_true",
                        help="print the codec's round-trip error on 256 groups of world seed 99 "
                             "(one JSON line)")
    parser.add_argument("--weights", default=None,
                        help="the codec --sheet and --held-out read (default: the one just "
                             "trained with --out, else the shipped one)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (default 4)")
    parser.add_argument("--width", type=int, default=22, help="network width (default 22)")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--groups", type=int, default=6000, help="rendered training groups")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--decoder-of", metavar="WEIGHTS", default=None,
                        help="with --out: retrain only the decoder of this codec ('shipped' for "
                             "the shipped one); its encoder and latents stay exactly as they "
                             "are, so DiTs trained on them (the toon base) stay valid")
    parser.add_argument("--refresh-every", type=int, default=0,
                        help="render --groups new training groups every this many steps "
                             "(default 0: train on one set)")
    args = parser.parse_args(argv)
    if not (args.out or args.sheet or args.held_out):
        parser.error("give --out DIR to train a codec, and/or --sheet PNG or --held-out to "
                     "show one's round trip")
    if args.out and args.weights:
        parser.error("--weights picks a codec to show; with --out it is the new one")
    if min(args.channels, args.width, args.steps, args.batch, args.groups) < 1:
        parser.error("--channels, --width, --steps, --batch and --groups must be >= 1")
    if args.refresh_every < 0 or not args.lr > 0:
        parser.error("--refresh-every must be >= 0 and --lr > 0")
    if args.decoder_of and not args.out:
        parser.error("--decoder-of needs --out, the folder the retrained codec goes to")
    if args.out:
        start, encoder_from = None, None
        if args.decoder_of:
            source = (DEFAULT_WEIGHTS if args.decoder_of == "shipped"
                      else os.path.abspath(args.decoder_of))
            try:
                start = load_codec(source)
            except ValueError as err:
                raise UsageError(f"--decoder-of: {err}") from None
            # Read before training: --out may be the same folder, replaced at the end.
            with open(os.path.join(source, "codec.json"), encoding="utf-8") as f:
                encoder_from = {k: v for k, v in json.load(f).items()
                                if k not in ("shift", "scale")}
        codec, meta = train_codec(channels=args.channels, width=args.width, steps=args.steps,
                                  batch=args.batch, groups=args.groups, lr=args.lr,
                                  seed=args.seed, start=start,
                                  refresh_every=args.refresh_every)
        if encoder_from is not None:
            meta["encoder_from"] = encoder_from
        path = save_codec(args.out, codec, meta)
        print(f"wrote {path}: {json.dumps(meta)}")
    else:
        try:
            codec = load_codec(os.path.abspath(args.weights or DEFAULT_WEIGHTS))
        except ValueError as err:
            raise UsageError(f"--weights: {err}") from None
    if args.sheet:
        print(f"wrote {round_trip_sheet(codec, args.sheet)}")
    if args.held_out:
        print(json.dumps(held_out_error(codec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
