"""Tiny random Hugging Face models saved to folders, as a user's downloaded weights would be.

Shared by the parity tests (VAE, T5, converted sampling, pre-computation):

    save_tiny_vae(folder, config, seed)                diffusers AutoencoderKLCogVideoX
    train_spiece(folder, lines, vocab_size)            a sentencepiece model (spiece.model)
    spiece_lines(words, count, ...)                    a random corpus for it
    save_tiny_t5(folder, config, tok_dir=..., ...)     transformers T5EncoderModel

Norm weights (and T5's relative-position bias) start at constants in a fresh model; the
builders perturb them so that an importer mixing them up fails its parity test.
"""

from __future__ import annotations

import io
import os
import random
import shutil

import torch


def save_tiny_vae(folder: str, config: dict, seed: int, *, perturb_norms: bool = True):
    """Saves a random `AutoencoderKLCogVideoX(**config)` to `folder`; returns the torch model."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    model = AutoencoderKLCogVideoX(**config).eval()
    if perturb_norms:
        with torch.no_grad():  # norms start at (1, 0)
            for key, p in model.named_parameters():
                if "norm" in key:
                    p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def spiece_lines(words, count: int, min_words: int, max_words: int, *, capitalize: bool = False,
                 ends: str | None = None, seed: int = 0) -> list[str]:
    """`count` random sentences of `min_words`..`max_words` words; each ends with a random
    character of `ends` (capitalized if asked), or with "." when `ends` is None."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        if capitalize:
            line = line.capitalize()
        lines.append(line + (rng.choice(ends) if ends is not None else "."))
    return lines


def train_spiece(folder: str, lines: list[str], vocab_size: int) -> None:
    """Trains a unigram sentencepiece model with T5's special ids into `folder/spiece.model`."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())


def save_tiny_t5(folder: str, config: dict, *, tok_dir: str | None = None, seed: int = 0,
                 dtype=torch.float32, max_shard_size=None):
    """Saves a random transformers `T5EncoderModel(T5Config(**config))` with perturbed norms
    and relative-position bias to `folder` (plus the files of `tok_dir`, if given); returns
    the torch model in float32 with the saved (possibly rounded) weights."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**config)).eval()
    # Random init gives the tiny relative-bias table near-zero values; make it matter.
    with torch.no_grad():
        att = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        att.weight.normal_(0.0, 1.0)
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, **kw)
    if tok_dir is not None:
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), folder)
    return model.to(dtype).float()
