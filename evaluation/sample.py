"""Text in, text out around `inference.generate`: batched prompts of any lengths, completions cut at EOS.

  texts = sample.complete(model, tok, ["def fib(", "import "], max_new_tokens=64, temperature=0.8, seed=0)
  texts = sample.sample(model, tok, "def fib(", num_samples=4, temperature=0.8, top_p=0.95, seed=0)

Prompts are tokenized as the training pipeline starts a document (BOS first when the tokenizer has
one), right-padded into one batch with `prompt_lengths`, and decoded from the first generated token up
to (not including) the first EOS. A fixed seed gives the same completions every time.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import logging

import inference
import models
from data import tokenizers
from inference.prompts import completion_ids, encode_prompts, pad_prompts

__all__ = ["complete", "complete_ids", "completion_ids", "encode_prompts", "max_new_tokens_that_fit", "pad_prompts",
           "sample"]


def max_new_tokens_that_fit(model: models.Transformer, prompt_len: int, wanted: int) -> int:
  """`wanted`, or fewer when prompt + wanted would pass max_position_embeddings (with a warning)."""
  room = model.cfg.max_position_embeddings - prompt_len
  if room < 1:
    raise ValueError(f"the prompt ({prompt_len} tokens) fills the model's {model.cfg.max_position_embeddings} "
                     "positions")
  if wanted > room:
    logging.warning("max_new_tokens %d + prompt %d exceeds max_position_embeddings %d; generating %d",
                    wanted, prompt_len, model.cfg.max_position_embeddings, room)
    print(f"WARNING: generating {room} tokens, not {wanted}: the model has "
          f"{model.cfg.max_position_embeddings} positions")
  return min(wanted, room)


def complete(model: models.Transformer, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str], *,
             max_new_tokens: int = 64, pad_to: int | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0) -> list[str]:
  """One completion per prompt (greedy by default), in one batched, compiled `generate` call."""
  ids, lengths = encode_prompts(tokenizer, prompts, pad_to=pad_to)
  return complete_ids(model, tokenizer, ids, lengths, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)


def complete_ids(model: models.Transformer, tokenizer: tokenizers.Tokenizer, ids, lengths, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int = 0) -> list[str]:
  """`complete` for prompts already tokenized and padded (`pad_prompts`)."""
  max_new_tokens = max_new_tokens_that_fit(model, ids.shape[1], max_new_tokens)
  stop = (tokenizer.eos_id,)
  tokens = inference.generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, stop_tokens=stop,
                              pad_id=tokenizer.pad_id, prompt_lengths=lengths)
  return [tokenizer.decode(g) for g in completion_ids(tokens, lengths, max_new_tokens, stop)]


def sample(model: models.Transformer, tokenizer: tokenizers.Tokenizer, prompt: str, *, num_samples: int = 1,
           **kwargs) -> list[str]:
  """`num_samples` completions of one prompt (rows of one batch draw independent samples)."""
  if int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
  return complete(model, tokenizer, [prompt] * num_samples, **kwargs)
