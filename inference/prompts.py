"""Prompts in, generated ids out, as `inference.generate` takes and returns them (no tokenizer types here).

  ids, lengths = encode_prompts(tokenizer, ["def fib(", "import "])      # right-padded int32 [B, T], [B]
  ids, lengths = pad_prompts([[5, 6, 7], [8]], pad_id=0)                 # token-id prompts
  rows = completion_ids(tokens_BS, lengths, max_new_tokens, stop_tokens=[eos])

A tokenizer is anything with `encode(str) -> list[int]`, `bos_id` (None: no BOS) and `pad_id`
(data/tokenizers.py's). Prompts start as the training pipeline starts a document: BOS first when the
tokenizer has one. Used by evaluation/sample.py (text in, text out) and training/rollout.py (GRPO).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode_prompts(tokenizer, prompts: Sequence[str], *, pad_to: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(int32 ids [B, T] right-padded with pad_id, int32 lengths [B]); T = max(lengths, pad_to)."""
  if isinstance(prompts, str):  # one string would silently become one prompt per character
    raise ValueError(f"prompts must be a sequence of strings, got the string {prompts!r}")
  if len(prompts) == 0:
    raise ValueError("prompts is empty: need at least one prompt")
  head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  rows = [head + tokenizer.encode(p) for p in prompts]
  for i, (p, r) in enumerate(zip(prompts, rows)):
    if not r:
      raise ValueError(f"prompt {i} ({p!r}) encodes to no tokens: generation needs at least one prompt token "
                       "(the byte tokenizer has no BOS to start from)")
  return pad_prompts(rows, tokenizer.pad_id, pad_to=pad_to)


def pad_prompts(rows: Sequence[Sequence[int]], pad_id: int, *, pad_to: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Token-id prompts → (int32 ids [B, T] right-padded with pad_id, int32 lengths [B])."""
  lengths = np.asarray([len(r) for r in rows], np.int32)
  t = max(int(lengths.max()), pad_to or 0)
  ids = np.full((len(rows), t), pad_id, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids, lengths


def completion_ids(tokens_BS, lengths_B, max_new_tokens: int, stop_tokens: Sequence[int]) -> list[list[int]]:
  """The generated ids of each row of `generate`'s output, up to the first stop token."""
  stops, out = {int(s) for s in stop_tokens}, []
  for row, n in zip(np.asarray(tokens_BS), np.asarray(lengths_B)):
    gen = row[int(n):int(n) + max_new_tokens].tolist()
    end = next((i for i, t in enumerate(gen) if t in stops), len(gen))
    out.append(gen[:end])
  return out
