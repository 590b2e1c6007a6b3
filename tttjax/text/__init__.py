"""Text encoders for prompts: T5 (imported from transformers folders) and its tokenizer.

  tokenizer  T5SentencePieceTokenizer: spiece.model + added tokens -> padded ids
  t5         T5Config, T5Encoder (Flax NNX), load_t5_encoder, T5TextEncoder (prompts -> [B, S, D])

The toon world's download-free encoder lives in `tttjax.data.text_encoder`.
"""

from tttjax.text.t5 import T5Config, T5Encoder, T5TextEncoder, load_t5_encoder
from tttjax.text.tokenizer import SCENE_TOKENS, T5SentencePieceTokenizer

__all__ = ["SCENE_TOKENS", "T5Config", "T5Encoder", "T5SentencePieceTokenizer", "T5TextEncoder",
           "load_t5_encoder"]
