"""Token layout of a multi-segment video for the paper's integration (docs/design.md §2).

The DiT keeps text and video tokens apart, `text [B, n, S, D]` (one prompt of `S` tokens per
3-second segment) and `video [B, T*h*w, D]` in (t, h, w) order. The sequence mixer instead
scans one interleaved sequence

    [text_0, video_0, text_1, video_1, ..., text_{n-1}, video_{n-1}]

where video chunk 0 holds the first `T - (n-1) * frames_per_segment` latent frames (the
extra first latent frame plus segment 0, 13 frames for CogVideoX) and every later chunk
`frames_per_segment` (12) frames, as in the public ttt-video-dit code. The reversed pass
reads segments backwards with each prompt kept in reading order in front of its video chunk,
and the video reversed token by token:

    [text_{n-1}, rev(video_{n-1}), ..., text_0, rev(video_0)]

so the video part is exactly the whole flattened video reversed. (The public code reverses
text and video separately and re-interleaves with the forward chunk sizes, which pairs the
last prompt with a 13-frame chunk; tttjax keeps every prompt next to its own frames.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

TEXT, VIDEO = 0, 1  # modality ids, rows of the gated mixer's gate tables


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """Static geometry of one forward pass (hashable, so jit can key on it)."""

    num_frames: int          # latent frames T
    grid_h: int              # patches per column
    grid_w: int              # patches per row
    num_segments: int        # text prompts n
    text_len: int            # tokens per prompt S
    frames_per_segment: int  # 12 for CogVideoX at 16 fps
    prefix_frames: int = 1   # extra first frame / window overlap

    def __post_init__(self):
        first = self.num_frames - (self.num_segments - 1) * self.frames_per_segment
        if self.num_segments < 1 or first < 1:
            raise ValueError(
                f"{self.num_segments} text segments need more than "
                f"{(self.num_segments - 1) * self.frames_per_segment} latent frames "
                f"({self.frames_per_segment} per segment), got {self.num_frames}; pass one prompt "
                "per 3-second segment")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def video_len(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def total_text_len(self) -> int:
        return self.num_segments * self.text_len

    @property
    def seq_len(self) -> int:
        return self.total_text_len + self.video_len

    @property
    def chunk_frames(self) -> tuple[int, ...]:
        """Latent frames of each video chunk in the interleaved sequence."""
        fps, n = self.frames_per_segment, self.num_segments
        return (self.num_frames - (n - 1) * fps,) + (fps,) * (n - 1)

    @property
    def window_frames(self) -> int:
        """Frames one attention window sees: a segment plus its prefix frame(s)."""
        return self.frames_per_segment + self.prefix_frames

    def check_windows(self) -> None:
        """Segment attention needs `T = prefix + n * frames_per_segment` exactly."""
        want = self.prefix_frames + self.num_segments * self.frames_per_segment
        if self.num_frames != want:
            raise ValueError(
                f"segment attention over {self.num_segments} segment(s) of "
                f"{self.frames_per_segment} latent frames plus {self.prefix_frames} prefix frame(s) "
                f"needs {want} latent frames, got {self.num_frames}; give one prompt per segment "
                "or use attention='full'")

    # -------------------------------------------------------------- interleaving

    def _chunk_bounds(self) -> list[tuple[int, int]]:
        hw, bounds, start = self.tokens_per_frame, [], 0
        for frames in self.chunk_frames:
            bounds.append((start, start + frames * hw))
            start += frames * hw
        return bounds

    def interleave(self, text: jax.Array, video: jax.Array) -> jax.Array:
        """text [B, n, S, D], video [B, T*h*w, D] -> [B, n*S + T*h*w, D] interleaved."""
        parts = []
        for i, (lo, hi) in enumerate(self._chunk_bounds()):
            parts += [text[:, i], video[:, lo:hi]]
        return jnp.concatenate(parts, axis=1)

    def deinterleave(self, seq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Inverse of `interleave`: [B, L, D] -> (text [B, n, S, D], video [B, T*h*w, D])."""
        texts, videos, start = [], [], 0
        for lo, hi in self._chunk_bounds():
            texts.append(seq[:, start:start + self.text_len])
            start += self.text_len
            videos.append(seq[:, start:start + hi - lo])
            start += hi - lo
        return jnp.stack(texts, axis=1), jnp.concatenate(videos, axis=1)

    @functools.cached_property
    def modality(self) -> np.ndarray:
        """[L] int32 modality id (TEXT / VIDEO) of each interleaved position."""
        parts = []
        for lo, hi in self._chunk_bounds():
            parts += [np.full(self.text_len, TEXT, np.int32), np.full(hi - lo, VIDEO, np.int32)]
        return np.concatenate(parts)

    @functools.cached_property
    def reverse_index(self) -> np.ndarray:
        """[L] int32: position in the interleaved sequence of each token of the reversed pass."""
        starts, pos = [], 0
        for lo, hi in self._chunk_bounds():
            starts.append((pos, pos + self.text_len, hi - lo))
            pos += self.text_len + hi - lo
        parts = []
        for text_start, video_start, video_len in reversed(starts):
            parts.append(np.arange(text_start, text_start + self.text_len))
            parts.append(np.arange(video_start + video_len - 1, video_start - 1, -1))
        return np.concatenate(parts).astype(np.int32)

    def interleave_rope(self, video_cos: jax.Array, video_sin: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
        """Video RoPE tables [T*h*w, d] -> interleaved tables [L, d], identity on text."""
        d = video_cos.shape[-1]
        ones = jnp.ones((self.text_len, d), video_cos.dtype)
        zeros = jnp.zeros((self.text_len, d), video_sin.dtype)
        cos, sin = [], []
        for lo, hi in self._chunk_bounds():
            cos += [ones, video_cos[lo:hi]]
            sin += [zeros, video_sin[lo:hi]]
        return jnp.concatenate(cos, axis=0), jnp.concatenate(sin, axis=0)
