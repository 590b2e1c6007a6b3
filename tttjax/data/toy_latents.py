"""A fixed "toy latent" codec for the toon world: no VAE is trained or downloaded.

The tiny DiT configs train on toon videos turned into latents of the CogVideoX geometry
(4x temporal, 8x spatial compression, C channels) by a fixed linear map:

    encode:  frames uint8 [F = 1 + 4k, H, W, 3]  ->  latents float32 [1 + k, C, H/8, W/8]
      1. pixels to [-1, 1]
      2. time: latent frame 0 is frame 0; latent frame j >= 1 averages frames 4j-3 .. 4j
         (CogVideoX's causal grouping)
      3. space: average over each 8 x 8 pixel block (one RGB colour per latent pixel)
      4. channels: z = SCALE * Q (rgb - SHIFT), Q a fixed [C, 3] matrix with orthonormal
         columns (QR of a seeded Gaussian matrix), so C >= 3

    decode:  rgb = Q^T z / SCALE + SHIFT, each latent pixel painted over its 8 x 8 block and
             each latent frame j >= 1 repeated over its 4 frames.

`decode` is the exact pseudo-inverse of `encode`: `decode(encode(x))` is `x` averaged over
the 4 x 8 x 8 blocks, and `encode(decode(z))` is `z` projected onto the 3-dimensional
colour subspace spanned by Q (a model's output off that subspace is discarded). The codec
keeps one colour per 4 x 8 x 8 block, so decoded toon videos are blocky (an 8 x 8 latent is an
8 x 8 mosaic of a 64 x 64 video): it exists to train and demonstrate the whole pipeline on a
CPU, not to make pretty videos. SHIFT and SCALE are fixed constants measured once on the toon
world (mean colour and overall standard deviation after the shift) so latents are roughly
zero-mean with unit variance, as diffusion training expects.

`make_toon_codec("learned", C)` gives the learned alternative of the same geometry
(`tttjax.data.toon_codec`, a small convolutional autoencoder whose decoded frames show the
characters); `config.data.toon_codec` picks one for training and sampling.
"""

from __future__ import annotations

import numpy as np

SHIFT = np.array([0.23, 0.14, 0.06], np.float32)    # mean toon colour in [-1, 1]
SCALE = 2.7                                           # about 1 / std of the shifted colours


class FrameCodec:
    """The conventions both toon codecs share (this module's linear one and the learned
    `tttjax.data.toon_codec.LearnedToonCodec`): 1 + temporal k frames make 1 + k latent
    frames; frames are uint8 or floats in [-1, 1]; `decode` is `decode_float` clipped to
    uint8. Subclasses set `channels`, `temporal`, `spatial` and define `encode` /
    `decode_float`."""

    channels: int
    temporal: int
    spatial: int

    def latent_frames(self, num_frames: int) -> int:
        if num_frames < 1 or (num_frames - 1) % self.temporal:
            raise ValueError(f"{type(self).__name__} needs 1 + {self.temporal} k frames, got "
                             f"{num_frames}")
        return 1 + (num_frames - 1) // self.temporal

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal

    def unit_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 or [-1, 1] float frames [F, H, W, 3], checked against the geometry ->
        float32 [F, H, W, 3] in [-1, 1]."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
        f, h, w, _ = frames.shape
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"frame size {h}x{w} must be a multiple of {self.spatial}")
        self.latent_frames(f)
        x = frames.astype(np.float32)
        return x / 127.5 - 1.0 if frames.dtype == np.uint8 else x

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [T, C, h, w] -> uint8 frames [1 + temporal (T-1), spatial h, spatial w, 3]."""
        x = np.clip(self.decode_float(latents), -1.0, 1.0)
        return np.round((x + 1.0) * 127.5).astype(np.uint8)


class ToyLatentCodec(FrameCodec):
    """Encode toon frames to latents and back with a fixed linear map (see the module doc)."""

    def __init__(self, channels: int, *, temporal: int = 4, spatial: int = 8, seed: int = 0):
        if channels < 3:
            raise ValueError(f"ToyLatentCodec: channels must be >= 3 to hold an RGB colour, got "
                             f"{channels}")
        if temporal < 1 or spatial < 1:
            raise ValueError("ToyLatentCodec: temporal and spatial compression must be >= 1")
        self.channels, self.temporal, self.spatial = int(channels), int(temporal), int(spatial)
        rng = np.random.default_rng([seed, channels])
        q, _ = np.linalg.qr(rng.standard_normal((channels, 3)))
        self.basis = q.astype(np.float32)            # [C, 3], basis.T @ basis = I

    def pool(self, frames: np.ndarray) -> np.ndarray:
        """uint8 or [-1, 1] float frames [F, H, W, 3] -> block means float32 [T, h, w, 3]."""
        x = self.unit_frames(frames)
        _, h, w, _ = x.shape
        s = self.spatial
        rest = x[1:].reshape(-1, self.temporal, h, w, 3).mean(axis=1)
        x = np.concatenate([x[:1], rest], axis=0)
        return x.reshape(-1, h // s, s, w // s, s, 3).mean(axis=(2, 4))

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames [F, H, W, 3] (uint8, or float in [-1, 1]) -> latents float32 [T, C, h, w]."""
        rgb = self.pool(frames) - SHIFT
        return (SCALE * np.einsum("thwk,ck->tchw", rgb, self.basis)).astype(np.float32)

    def decode_float(self, latents: np.ndarray) -> np.ndarray:
        """latents [T, C, h, w] -> frames float32 [1 + 4(T-1), 8h, 8w, 3], unclipped."""
        z = np.asarray(latents, np.float32)
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"latents must be [T, {self.channels}, h, w], got shape {z.shape}")
        rgb = np.einsum("tchw,ck->thwk", z, self.basis) / SCALE + SHIFT
        s = self.spatial
        rgb = np.repeat(np.repeat(rgb, s, axis=1), s, axis=2)
        return np.concatenate([rgb[:1], np.repeat(rgb[1:], self.temporal, axis=0)], axis=0)


TOON_CODECS = ("linear", "learned")


def make_toon_codec(kind: str, channels: int, *, seed: int = 0):
    """The toon world's latent codec named by `config.data.toon_codec`.

    "linear": this module's fixed `ToyLatentCodec` (an 8 x 8 colour mosaic per frame);
    "learned": the convolutional autoencoder of `tttjax.data.toon_codec` (the weights shipped
    with tttjax), which draws the cat, the mouse and the cheese. Both map uint8 frames
    [1 + 4k, H, W, 3] to float32 latents [1 + k, channels, H/8, W/8] and back.
    """
    if kind == "linear":
        return ToyLatentCodec(channels, seed=seed)
    if kind == "learned":
        from tttjax.data.toon_codec import codec_for_channels

        return codec_for_channels(channels)
    raise ValueError(f"config.data.toon_codec {kind!r} not in {TOON_CODECS}")
