"""A download-free text encoder for the toon world, with the T5 embedding interface.

    encoder = HashedTextEncoder(dim=4096)
    emb = encoder.encode(["The cat jumps.", "<start_scene> The mouse hides."], max_length=226)
    # emb: float32 [2, 226, 4096]; rows past a prompt's last token are zero

Tokens are lower-cased words, numbers, punctuation marks and the scene markers
`<start_scene>` / `<end_scene>`. Token `w` at position `i` embeds as

    e(w) + POS_SCALE * p(i)

where `e(w)` is a fixed Gaussian vector with unit expected squared norm per dimension
(N(0, 1) entries), seeded by a stable hash (BLAKE2b) of the word and `seed`, and `p(i)`
the sinusoidal position code of Vaswani et al. (sin on even, cos on odd dimensions).
Nothing is learned or downloaded, the same word always maps to the same vector, and
different words are nearly orthogonal in high dimension, so the DiT's text projection can
learn from it which action a caption names. Prompts longer than `max_length` tokens are cut
(captions put the action sentence first for this reason).

This stands in for T5-XXL on the toon world only; real data carries T5 embeddings computed
by `python -m tttjax.precompute`.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np

START_SCENE, END_SCENE = "<start_scene>", "<end_scene>"
POS_SCALE = 0.5
_TOKEN = re.compile(r"<start_scene>|<end_scene>|[a-z]+|[0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words, numbers, single punctuation marks and the two scene markers."""
    return _TOKEN.findall(text.lower())


def segment_prompt(caption: str, scene_start: bool, scene_end: bool) -> str:
    """A segment's prompt with the storyboard's scene markers around its caption."""
    parts = ([START_SCENE] if scene_start else []) + [caption.strip()] + (
        [END_SCENE] if scene_end else [])
    return " ".join(parts)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """[length, dim] float32: sin(i / 10000^(2k/dim)) at 2k, cos at 2k + 1."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = 10000.0 ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    out = np.zeros((length, dim), np.float64)
    out[:, 0::2] = np.sin(pos * freq)
    out[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
    return out.astype(np.float32)


class HashedTextEncoder:
    """Hashed word embeddings plus sinusoidal positions; `encode` mirrors the T5 encoder."""

    def __init__(self, dim: int, *, seed: int = 0):
        if dim < 2:
            raise ValueError(f"HashedTextEncoder: dim must be >= 2, got {dim}")
        self.dim, self.seed = int(dim), int(seed)
        self._word = functools.lru_cache(maxsize=65536)(self._word_vector)

    # Grain's worker processes receive the transform pickled; the per-instance cache is not
    # picklable, so it is dropped and rebuilt on the other side.
    def __getstate__(self) -> dict:
        return {"dim": self.dim, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dim"], seed=state["seed"])

    def _word_vector(self, word: str) -> np.ndarray:
        digest = hashlib.blake2b(f"{self.seed}:{word}".encode(), digest_size=16).digest()
        rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))
        return rng.standard_normal(self.dim).astype(np.float32)

    def encode_one(self, text: str, max_length: int) -> np.ndarray:
        """float32 [max_length, dim] for one prompt."""
        out = np.zeros((max_length, self.dim), np.float32)
        tokens = tokenize(text)[:max_length]
        if tokens:
            out[: len(tokens)] = np.stack([self._word(t) for t in tokens])
            out[: len(tokens)] += POS_SCALE * _positions(len(tokens), self.dim)
        return out

    def encode(self, texts: list[str], max_length: int) -> np.ndarray:
        """float32 [len(texts), max_length, dim]; zeros after each prompt's last token."""
        if isinstance(texts, str):
            raise ValueError("HashedTextEncoder.encode takes a list of strings, got one string; "
                             "wrap it in a list")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        return np.stack([self.encode_one(t, max_length) for t in texts]) if texts else \
            np.zeros((0, max_length, self.dim), np.float32)


@functools.lru_cache(maxsize=64)
def _positions(length: int, dim: int) -> np.ndarray:
    return sinusoidal_positions(length, dim)
