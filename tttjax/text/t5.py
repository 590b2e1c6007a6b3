"""The T5 encoder (T5-XXL for CogVideoX) in Flax NNX, imported from transformers folders.

    encoder = T5TextEncoder.from_pretrained("CogVideoX-5b")   # text_encoder/ + tokenizer/
    emb = encoder.encode(["A cat jumps."], max_length=226)    # float32 [1, 226, 4096]

The network (transformers' `T5EncoderModel`, eval mode), with x the token embeddings:

    for each layer:  x = x + O(Attention(RMS(x)))        no 1/sqrt(d) scaling; scores get the
                                                          relative position bias of layer 0
                     x = x + FF(RMS(x))                   relu: Wo relu(Wi x)
                                                          gated-gelu (v1.1, XXL):
                                                            Wo (gelu_tanh(W0 x) * W1 x)
    out = RMS(x)                                          RMS(x) = w * x / sqrt(mean(x^2) + eps)

Relative position bias: the key-minus-query distance is bucketed (bidirectional: half the
buckets per sign; exact up to num_buckets/4, then logarithmic up to max_distance), and each
bucket has a learned per-head scalar. Buckets are computed in float32 NumPy exactly as
transformers does, so the bucket boundaries agree.

Per-layer weights are stacked on a leading `layers` axis and the layers run in one
`lax.scan` (one compiled layer for all 24 of T5-XXL). Weights are read tensor by tensor
from the safetensors files (sharded or not, float32 or bfloat16); decoder weights of a full
T5 checkpoint are ignored.

`encode` follows CogVideoX's `_get_t5_prompt_embeds`: pad to `max_length` (226) with
<pad>, cut longer prompts, and run the encoder WITHOUT an attention mask (padding tokens
are attended to, as in CogVideoX's training); embeddings of every position are returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax import storage
from tttjax.local_copy import local_folder
from tttjax.logical_params import logical_param
from tttjax.safetensors_folder import (ShapeMismatch, TensorReader, model_folder, read_parameter,
                                       weight_files)
from tttjax.text.tokenizer import SCENE_TOKENS, T5SentencePieceTokenizer

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder hyper-parameters; defaults are T5-v1.1-XXL's (CogVideoX's text encoder)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or (
                self.activation_name not in _ACTIVATIONS):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use "
                             f"'ACT' or 'gated-ACT' with ACT in {sorted(_ACTIVATIONS)}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5 config {name} must be >= 1, got {getattr(self, name)}")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation ("gelu_new").
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_transformers(cls, config: dict) -> "T5Config":
        """From a transformers T5 `config.json` dict."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
    """int32 [query_length, key_length] bucket of each (query, key) pair (module docstring)."""
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    # float32 steps in transformers' order, so boundary cases round the same way.
    with np.errstate(divide="ignore"):
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def _rms_norm(x, weight, eps, dtype):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * y.astype(dtype)


class T5Encoder(nnx.Module):
    """T5 encoder stack: ids [B, S] -> hidden states [B, S, d_model] in `dtype`."""

    def __init__(self, config: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, jnp.dtype(dtype)
        c = config
        L, D, H, K, F = c.num_layers, c.d_model, c.num_heads, c.d_kv, c.d_ff

        def param(shape, names, std):
            value = std * jax.random.normal(rngs.params(), shape, self.dtype) if std else (
                jnp.ones(shape, self.dtype))
            return logical_param(value, names)

        self.embed = param((c.vocab_size, D), ("vocab", "embed"), 1.0)
        self.relative_attention_bias = param((c.relative_attention_num_buckets, H),
                                             (None, "heads"), 1.0)
        self.attn_norm = param((L, D), ("layers", "norm"), 0)
        self.q = param((L, D, H, K), ("layers", "embed", "heads", "kv"), (D * K) ** -0.5)
        self.k = param((L, D, H, K), ("layers", "embed", "heads", "kv"), D ** -0.5)
        self.v = param((L, D, H, K), ("layers", "embed", "heads", "kv"), D ** -0.5)
        self.o = param((L, H, K, D), ("layers", "heads", "kv", "embed"), (H * K) ** -0.5)
        self.ff_norm = param((L, D), ("layers", "norm"), 0)
        if c.gated:
            self.wi_0 = param((L, D, F), ("layers", "embed", "mlp"), D ** -0.5)
            self.wi_1 = param((L, D, F), ("layers", "embed", "mlp"), D ** -0.5)
        else:
            self.wi = param((L, D, F), ("layers", "embed", "mlp"), D ** -0.5)
        self.wo = param((L, F, D), ("layers", "mlp", "embed"), F ** -0.5)
        self.final_norm = param((D,), ("norm",), 0)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """input_ids int [B, S]; attention_mask [B, S] (1 = attend) or None (attend to all)."""
        c, dt = self.config, self.dtype
        precision = "highest" if dt == jnp.float32 else None
        dot = functools.partial(jnp.einsum, precision=precision)
        s = input_ids.shape[1]
        buckets = relative_position_buckets(s, s, c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        bias = jnp.take(self.relative_attention_bias[...], jnp.asarray(buckets), axis=0)
        bias = jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)     # [1, H, S, S]
        if attention_mask is not None:
            keep = attention_mask.astype(bool)[:, None, None, :]
            bias = jnp.where(keep, bias, jnp.finfo(jnp.float32).min)
        act = _ACTIVATIONS[c.activation_name]

        def layer(h, p):
            x = _rms_norm(h, p["attn_norm"], c.layer_norm_epsilon, dt)
            q, k, v = (dot("bsd,dhk->bshk", x, p[n]) for n in ("q", "k", "v"))
            scores = dot("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + bias
            w = jax.nn.softmax(scores, axis=-1).astype(dt)
            h = h + dot("bqhk,hkd->bqd", dot("bhqs,bshk->bqhk", w, v), p["o"])
            x = _rms_norm(h, p["ff_norm"], c.layer_norm_epsilon, dt)
            if c.gated:
                f = act(dot("bsd,df->bsf", x, p["wi_0"])) * dot("bsd,df->bsf", x, p["wi_1"])
            else:
                f = act(dot("bsd,df->bsf", x, p["wi"]))
            return h + dot("bsf,fd->bsd", f, p["wo"]), None

        names = ["attn_norm", "q", "k", "v", "o", "ff_norm", "wo"] + (
            ["wi_0", "wi_1"] if c.gated else ["wi"])
        stacked = {n: getattr(self, n)[...] for n in names}
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
        h, _ = jax.lax.scan(layer, h, stacked)
        return _rms_norm(h, self.final_norm[...], c.layer_norm_epsilon, dt)


# ------------------------------------------------------------------------------ import


def _sources(c: T5Config) -> dict[str, tuple[str, object]]:
    """{our param: (transformers key, `{i}` = layer, torch [out, in] -> our layout)}."""
    D, H, K = c.d_model, c.num_heads, c.d_kv
    blk = "encoder.block.{i}.layer."
    out = {
        "relative_attention_bias": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
                                    ".weight", None),
        "attn_norm": (blk + "0.layer_norm.weight", None),
        "q": (blk + "0.SelfAttention.q.weight", lambda w: w.T.reshape(D, H, K)),
        "k": (blk + "0.SelfAttention.k.weight", lambda w: w.T.reshape(D, H, K)),
        "v": (blk + "0.SelfAttention.v.weight", lambda w: w.T.reshape(D, H, K)),
        "o": (blk + "0.SelfAttention.o.weight", lambda w: w.T.reshape(H, K, D)),
        "ff_norm": (blk + "1.layer_norm.weight", None),
        "wo": (blk + "1.DenseReluDense.wo.weight", lambda w: w.T),
        "final_norm": ("encoder.final_layer_norm.weight", None),
    }
    for name in (("wi_0", "wi_1") if c.gated else ("wi",)):
        out[name] = (blk + f"1.DenseReluDense.{name}.weight", lambda w: w.T)
    return out


def _model_folder(path: str) -> str:
    return model_folder(path, "text_encoder", "transformers' T5EncoderModel.save_pretrained")


def load_t5_encoder(path: str, *, dtype=jnp.float32) -> T5Encoder:
    """A `T5Encoder` with the weights of a transformers T5 folder (or a pipeline's text_encoder/);
    a `gs://` folder is read through a temporary local copy (`tttjax.local_copy`).

    Raises ValueError naming missing keys or shape mismatches.
    """
    with local_folder(path, subfolders=("text_encoder",)) as local:
        return _load_local_t5_encoder(local, dtype=dtype)


def _load_local_t5_encoder(path: str, *, dtype) -> T5Encoder:
    folder = _model_folder(path)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = T5Config.from_transformers(json.load(f))
    files = weight_files(folder)
    embed_key = next((k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in files), None)
    sources = _sources(config)
    missing = [] if embed_key else ["shared.weight"]
    for key, _ in sources.values():
        layers = range(config.num_layers) if "{i}" in key else [None]
        missing += [key.format(i=i) for i in layers if key.format(i=i) not in files]
    if missing:
        raise ValueError(f"T5 checkpoint in {folder!r} lacks {len(missing)} tensors its config.json "
                         f"implies, e.g. {missing[:3]}; is it a T5 (v1.0/v1.1) encoder folder?")

    abstract = nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    sources["embed"] = (embed_key, None)
    values = {}
    with TensorReader(files) as read:
        for path_, var in nnx.to_flat_state(state):
            name = "/".join(str(p) for p in path_)
            key, transform = sources[name]
            try:
                buf = read_parameter(read, key, var.shape, var.dtype, transform)
            except ShapeMismatch as err:
                raise ValueError(f"{err.key} in {folder!r} has shape {err.stored}, which does not "
                                 f"fit {err.wanted} from its config.json") from None
            values[path_] = jnp.asarray(buf)
            del buf
    flat = [(p, v.replace(values[p])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------ text -> embeddings


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_ids(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).astype(jnp.float32)


def _tokenizer_folder(path: str, model_folder: str) -> str:
    for folder in (path, model_folder, os.path.join(path, "tokenizer"),
                   os.path.join(os.path.dirname(os.path.abspath(model_folder)), "tokenizer")):
        if os.path.isfile(os.path.join(folder, "spiece.model")):
            return folder
    raise ValueError(f"no spiece.model in {path!r} or a tokenizer/ folder next to it; pass "
                     "tokenizer_path= (the folder holding spiece.model)")


class T5TextEncoder:
    """Prompts -> T5 embeddings, with the interface of the toon world's hashed encoder."""

    def __init__(self, tokenizer: T5SentencePieceTokenizer, model: T5Encoder):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer makes ids up to {tokenizer.vocab_size - 1} but the "
                             f"encoder has {model.config.vocab_size} embeddings; use the "
                             "tokenizer saved with this encoder")
        self.tokenizer, self.model = tokenizer, model
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer_path: str | None = None, dtype=jnp.float32,
                        extra_tokens: Sequence[str] = SCENE_TOKENS) -> "T5TextEncoder":
        """From a T5 folder (config.json + safetensors + spiece.model), or a CogVideoX
        pipeline folder with text_encoder/ and tokenizer/. `extra_tokens` are added as special
        tokens when the tokenizer lacks them (default: the scene markers). `gs://` folders
        are read through temporary local copies (`tttjax.local_copy`): of a pipeline folder
        only text_encoder/ and tokenizer/; a text_encoder/ folder given alone finds the
        tokenizer/ next to it in the bucket as it would on disk."""
        with contextlib.ExitStack() as stack:
            local = stack.enter_context(
                local_folder(path, subfolders=("text_encoder", "tokenizer")))
            model_folder = _model_folder(local)
            if tokenizer_path is None and storage.is_url(path):
                try:
                    _tokenizer_folder(local, model_folder)
                except ValueError:   # not in the copy: the bucket's sibling tokenizer/, if any
                    sibling = storage.resolve(path).rsplit("/", 1)[0] + "/tokenizer"
                    if (storage.path(sibling) / "spiece.model").is_file():
                        tokenizer_path = sibling
            tok_local = stack.enter_context(local_folder(tokenizer_path, subfolders=()))
            tok_folder = tok_local or _tokenizer_folder(local, model_folder)
            tokenizer = T5SentencePieceTokenizer.from_pretrained(tok_folder,
                                                                 extra_tokens=extra_tokens)
            return cls(tokenizer, _load_local_t5_encoder(model_folder, dtype=dtype))

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, texts: Sequence[str], max_length: int = 226) -> np.ndarray:
        """int32 [len(texts), max_length] token ids (padded / cut, `</s>` last)."""
        return self.tokenizer(texts, max_length=max_length)

    def encode(self, texts: Sequence[str], max_length: int = 226, *, batch_size: int = 8
               ) -> np.ndarray:
        """float32 [len(texts), max_length, d_model] embeddings of every position.

        Prompts run `batch_size` at a time (the last batch padded with empty prompts, so
        one compiled program serves any number of prompts).
        """
        ids = self.tokenize(texts, max_length)
        if len(ids) == 0:
            return np.zeros((0, max_length, self.dim), np.float32)
        batch = max(1, min(batch_size, len(ids)))
        pad = (-len(ids)) % batch
        if pad:
            ids = np.concatenate([ids, self.tokenize([""] * pad, max_length)])
        out = [np.asarray(_encode_ids(self._graphdef, self._state, jnp.asarray(ids[i:i + batch])))
               for i in range(0, len(ids), batch)]
        return np.concatenate(out)[:len(texts)]
