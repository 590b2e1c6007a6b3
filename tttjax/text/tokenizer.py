"""The T5 tokenizer, read from a transformers tokenizer folder with sentencepiece directly.

    tok = T5SentencePieceTokenizer.from_pretrained("CogVideoX-5b/tokenizer")
    ids = tok(["A cat jumps."], max_length=226)      # int32 [1, 226]

Ids are those of transformers' `T5Tokenizer` / `T5TokenizerFast`:
  - `spiece.model` pieces keep their sentencepiece ids (<pad> 0, </s> 1, <unk> 2, ...);
  - T5's sentinels `<extra_id_i>` follow them in reverse: id = n_pieces + extra_ids - 1 - i;
  - added special tokens come from the folder (`tokenizer.json` "added_tokens",
    `tokenizer_config.json` "added_tokens_decoder", `added_tokens.json`); `extra_tokens`
    appends more after the largest id, as `tokenizer.add_special_tokens` would. The
    storyboard's scene markers `<end_scene>`, `<start_scene>` are added this way, in that
    order, as the public ttt-video-dit sampler does (ids 32100, 32101 with T5-XXL).
A prompt is split at special tokens; each piece of text between them is encoded by
sentencepiece on its own, then `</s>` is appended. Sequences are cut to `max_length - 1`
tokens plus `</s>` and right-padded with <pad> (CogVideoX's `_get_t5_prompt_embeds`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from tttjax.local_copy import local_folder
from tttjax.optional_dependency import require

SCENE_TOKENS = ("<end_scene>", "<start_scene>")


def _load_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class T5SentencePieceTokenizer:
    """T5 tokenization with sentencepiece plus special tokens (see module docstring)."""

    def __init__(self, spiece_model: str, *, special_tokens: dict[str, int] | None = None,
                 extra_ids: int = 100, extra_tokens: Sequence[str] = ()):
        sentencepiece = require("sentencepiece", "text", "the T5 tokenizer")

        if not os.path.isfile(spiece_model):
            raise ValueError(f"no sentencepiece model at {spiece_model!r}; give the tokenizer "
                             "folder that holds spiece.model")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=spiece_model)
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"{spiece_model!r} has no <pad> or </s> piece; it is not a T5 "
                             "sentencepiece model")
        n = self.sp.get_piece_size()
        specials = {f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)}
        specials.update(special_tokens or {})
        next_id = max([n - 1, *specials.values()]) + 1
        for token in extra_tokens:
            if token not in specials:
                specials[token], next_id = next_id, next_id + 1
        self.special_tokens = dict(specials)
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._split = (re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")
                       if ordered else None)

    @classmethod
    def from_pretrained(cls, folder: str, *, extra_tokens: Sequence[str] = SCENE_TOKENS
                        ) -> "T5SentencePieceTokenizer":
        """Reads `folder/spiece.model` and the added tokens saved next to it (a `gs://`
        folder through a temporary local copy, `tttjax.local_copy`)."""
        with local_folder(folder, subfolders=()) as local:
            return cls._from_local(local, extra_tokens)

    @classmethod
    def _from_local(cls, folder: str, extra_tokens: Sequence[str]) -> "T5SentencePieceTokenizer":
        spiece = os.path.join(folder, "spiece.model")
        if not os.path.isfile(spiece):
            raise ValueError(f"no spiece.model in {folder!r}; give the T5 tokenizer folder "
                             "(e.g. CogVideoX-5b/tokenizer)")
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = _load_json(config_path) if os.path.isfile(config_path) else {}
        specials: dict[str, int] = {}
        for content, idx in _added_tokens(folder, config):
            specials[content] = int(idx)
        return cls(spiece, special_tokens=specials, extra_ids=int(config.get("extra_ids", 100)),
                   extra_tokens=extra_tokens)

    @property
    def vocab_size(self) -> int:
        """One past the largest id this tokenizer can produce."""
        return max([self.sp.get_piece_size() - 1, *self.special_tokens.values()]) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, `</s>` appended, no padding or truncation."""
        if not isinstance(text, str):
            raise ValueError(f"prompts must be strings, got {type(text).__name__}")
        ids: list[int] = []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids + [self.eos_id]

    def __call__(self, texts: Sequence[str], max_length: int = 226) -> np.ndarray:
        """int32 [len(texts), max_length]: cut to max_length (</s> kept last), <pad>-padded."""
        if isinstance(texts, str):
            raise ValueError("pass a list of prompts, not a single string")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        out = np.full((len(texts), max_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [self.eos_id]
            out[row, :len(ids)] = ids
        return out


def _added_tokens(folder: str, config: dict) -> list[tuple[str, int]]:
    """(content, id) of the added tokens recorded in a transformers tokenizer folder."""
    found: list[tuple[str, int]] = []
    tok_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tok_json):
        found += [(t["content"], t["id"]) for t in _load_json(tok_json).get("added_tokens", [])]
    for idx, entry in config.get("added_tokens_decoder", {}).items():
        found.append((entry["content"], int(idx)))
    added_json = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(added_json):
        found += list(_load_json(added_json).items())
    return found
