"""T5 encoder and tokenizer against transformers on tiny random models."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Tokenizer
from transformers.models.t5.modeling_t5 import T5Attention

from tiny_hf_models import save_tiny_t5, spiece_lines, train_spiece
from tttjax.text.t5 import T5Config, T5TextEncoder, load_t5_encoder, relative_position_buckets
from tttjax.text.tokenizer import SCENE_TOKENS, T5SentencePieceTokenizer

EXTRA_IDS = 10
TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0, layer_norm_epsilon=1e-6)
PROMPTS = [
    "The cat jumps over the table.",
    "  Tom   chases Jerry!! ",
    "",
    "Zebra xylophone \u00fcn\u00efcode 123",
    "<start_scene> The mouse hides in a hole in the wall. <end_scene>",
    "The big blue cat runs quickly<end_scene>",
    "a <extra_id_0> b",
    "the small brown mouse eats cheese slowly under the kitchen table near the door " * 4,
]


SPIECE_WORDS = ("the a cat mouse jumps runs over under table kitchen cheese hides chases blue gray "
                "brown small big quickly slowly room wall hole door jerry tom sunny beach wave").split()


def _train_spiece(folder):
    train_spiece(folder, spiece_lines(SPIECE_WORDS, 1500, 3, 12, capitalize=True, ends=".!?,"),
                 vocab_size=100)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A transformers tokenizer folder that also keeps its spiece.model."""
    folder = str(tmp_path_factory.mktemp("t5tok"))
    _train_spiece(folder)
    hf = T5Tokenizer.from_pretrained(folder, extra_ids=EXTRA_IDS)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    hf = T5Tokenizer.from_pretrained(tok_dir)
    hf.add_special_tokens({"additional_special_tokens": list(SCENE_TOKENS)})  # as ttt-video-dit
    return hf


def _save_t5(folder, tok_dir, dtype=torch.float32, max_shard_size=None, **overrides):
    return save_tiny_t5(folder, {**TINY, **overrides}, tok_dir=tok_dir, dtype=dtype,
                        max_shard_size=max_shard_size)


# ------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("max_length", [32, 12])
def test_tokenizer_matches_transformers(tok_dir, hf_tokenizer, max_length):
    ours = T5SentencePieceTokenizer.from_pretrained(tok_dir)
    ref = hf_tokenizer(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="np").input_ids
    got = ours(PROMPTS, max_length=max_length)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(got, ref)
    assert ours.special_tokens["<end_scene>"] == hf_tokenizer.convert_tokens_to_ids("<end_scene>")


def test_tokenizer_from_bare_spiece_model(tmp_path, tok_dir):
    shutil.copy(os.path.join(tok_dir, "spiece.model"), tmp_path)
    tok = T5SentencePieceTokenizer.from_pretrained(str(tmp_path), extra_tokens=())
    # T5's default: 100 sentinels after the pieces, in reverse.
    assert tok.special_tokens["<extra_id_0>"] == 100 + 99 and tok.vocab_size == 200
    assert tok(["<extra_id_99>"], max_length=3).tolist() == [[100, 1, 0]]
    with pytest.raises(ValueError, match="spiece.model"):
        T5SentencePieceTokenizer.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="list"):
        tok("one string", max_length=4)


# ------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 16), (16, 40)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_transformers(buckets, max_distance, bidirectional):
    n = 700
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional,
                                                num_buckets=buckets, max_distance=max_distance)
    ours = relative_position_buckets(n, n, buckets, max_distance, bidirectional)
    np.testing.assert_array_equal(ours, ref.numpy())


# ------------------------------------------------------------------------------ encoder


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(tmp_path, tok_dir, hf_tokenizer, ff):
    folder = str(tmp_path / ff)
    ref_model = _save_t5(folder, tok_dir, feed_forward_proj=ff)
    enc = T5TextEncoder.from_pretrained(folder)
    assert enc.dim == TINY["d_model"] and enc.model.config.gated == (ff == "gated-gelu")
    max_length = 40  # > max_distance: exercises the logarithmic and clamped buckets
    # CogVideoX's _get_t5_prompt_embeds: padded ids, no attention mask.
    ids = hf_tokenizer(PROMPTS, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ref_model(ids)[0].numpy()
    got = enc.encode(PROMPTS, max_length=max_length, batch_size=3)
    assert got.shape == (len(PROMPTS), max_length, TINY["d_model"]) and got.dtype == np.float32
    assert _rel_err(got, ref) < 1e-5, _rel_err(got, ref)
    assert np.max(np.abs(got - ref)) < 1e-4

    # With an attention mask, as a user of the bare module may pass one.
    mask = (ids != 0).long()
    with torch.no_grad():
        ref_m = ref_model(ids, attention_mask=mask)[0].numpy()
    got_m = np.asarray(enc.model(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
    assert _rel_err(got_m, ref_m) < 1e-5
    assert _rel_err(got_m, got) > 1e-3  # the mask matters, so CogVideoX's no-mask choice is checked


def test_bf16_sharded_checkpoint(tmp_path, tok_dir):
    folder = str(tmp_path / "bf16")
    ref_model = _save_t5(folder, tok_dir, dtype=torch.bfloat16, max_shard_size="20KB")
    assert any(n.endswith(".safetensors.index.json") for n in os.listdir(folder))
    ids = np.array([[5, 17, 33, 1, 0, 0, 0, 0, 0], [40, 41, 42, 43, 44, 45, 46, 47, 1]])
    model = load_t5_encoder(folder)  # bf16 weights read into float32
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids))[0].numpy()
    got = np.asarray(model(jnp.asarray(ids)))
    assert _rel_err(got, ref) < 1e-5
    model_bf16 = load_t5_encoder(folder, dtype=jnp.bfloat16)
    got_bf16 = np.asarray(model_bf16(jnp.asarray(ids)), np.float32)
    assert model_bf16.q[...].dtype == jnp.bfloat16
    assert _rel_err(got_bf16, ref) < 3e-2


def test_import_errors(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="config.json"):
        T5TextEncoder.from_pretrained(str(tmp_path))
    folder = str(tmp_path / "small_vocab")
    _save_t5(folder, tok_dir, vocab_size=100)
    with pytest.raises(ValueError, match="embeddings"):
        T5TextEncoder.from_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_layers"] = 5
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="lacks"):
        load_t5_encoder(folder)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-tanhshrink")
