"""The digits teacher's text side: a tiny CLIP tokenizer and a random, frozen CLIP text encoder.

Legend: B batch, T tokens (`max_length`), D text width.

The tokenizer is a real `transformers.CLIPTokenizer` (BPE, lower-case, EOS = pad, EOS
with the highest id as in OpenAI CLIP) whose vocabulary holds every lower-case letter
and digit, so any such text tokenises, plus merges that make each word of the prompt
template ("a", "handwritten", "digit") a single token; CLIP splits numbers into
digits, so "7" is the token "7</w>". The text encoder is our Flax `CLIPTextModel`
(quick-GELU: an SD 1.x-family text encoder) at random initialisation, kept frozen, as
SD keeps its CLIP frozen: the prompts differ in one token, and with causal attention
the digit's token and every token after it (EOS, padding) carry it, so a random
encoder already gives ten well-separated conditionings plus the empty prompt's.
"""

from __future__ import annotations

import re
import string

import jax
import numpy as np
import transformers

from d2g_jax.demo.fit import init_params
from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def template_words(template: str) -> list[str]:
  """The words of a prompt template (letters only; '{}' and digits are single characters)."""
  return re.findall(r"[a-z]+", template.lower())


def make_tokenizer(words: list[str], max_length: int) -> transformers.CLIPTokenizer:
  """A CLIP BPE tokenizer over characters in which each of `words` is one token."""
  chars = string.ascii_lowercase + string.digits
  vocab = {}
  for c in chars:
    vocab[c] = len(vocab)
  for c in chars:
    vocab[c + "</w>"] = len(vocab)
  merges = []
  for word in dict.fromkeys(words):  # chain merges: h+a, ha+n, han+d, ... hand...e+n</w>
    prefix = word[0]
    for k, c in enumerate(word[1:], start=2):
      piece = c + "</w>" if k == len(word) else c
      if (prefix, piece) not in merges:
        merges.append((prefix, piece))
        vocab.setdefault(prefix + piece, len(vocab))
      prefix += piece
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                                   pad_token=EOS)
  for word in words:
    ids = tok(word)["input_ids"]
    if len(ids) != 3:
      raise AssertionError(f"the tiny tokenizer splits {word!r} into {len(ids) - 2} tokens "
                           f"({tok.convert_ids_to_tokens(ids)}); expected one")
  return tok


def text_config(tokenizer, hidden_size: int, num_layers: int, num_heads: int) -> CLIPTextConfig:
  return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                        intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads,
                        max_position_embeddings=tokenizer.model_max_length,
                        hidden_act="quick_gelu", projection_dim=hidden_size,
                        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
                        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
                        pad_token_id=tokenizer.convert_tokens_to_ids(EOS))


def make_text_encoder(template: str, hidden_size: int, num_layers: int, num_heads: int,
                      max_length: int, seed: int):
  """(tokenizer, CLIPTextModel, random params) for prompts of `template`."""
  tokenizer = make_tokenizer(template_words(template), max_length)
  module = CLIPTextModel(text_config(tokenizer, hidden_size, num_layers, num_heads))
  params = init_params(module, seed, 2, np.zeros((1, max_length), np.int32))
  return tokenizer, module, params


def embed(tokenizer, module: CLIPTextModel, params, prompts: list[str]) -> np.ndarray:
  """BxTxD: what `StableDiffusionPipeline.encode_prompt` gives the UNet (last hidden state)."""
  ids = tokenizer(prompts, padding="max_length", truncation=True,
                  max_length=tokenizer.model_max_length, return_tensors="np")["input_ids"]
  out = jax.jit(lambda p, i: module.apply({"params": p}, i).last_hidden_state)(
      params, ids.astype(np.int32))
  return np.asarray(out, np.float32)
