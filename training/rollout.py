"""Rollouts for RL post-training: prompt records → sampled completions → the token batch an update reads.

  prompts = rollout.encode_prompts(records, tokenizer, template)        # once per run: one padded shape
  idx = rollout.step_indices(step, per_step, len(prompts), seed)        # which prompts step `step` takes
  out = rollout.sample(model, prompts, np.repeat(idx, G), tokenizer, max_new_tokens=16, temperature=1.0,
                       top_p=1.0, key=k, execution=execution)
  batch = rollout.update_batch(out)   # {tokens, positions, segment_ids, loss_mask} int32 [N, S]

Generation is the project's own `inference.generate_full` (latent MLA cache, one compiled loop, stop at
EOS), so rollouts and serving share one sampler. Prompts are rendered with the run's template
(data/prompts.py) and right-padded to the longest prompt of the whole set, so every step has the same
shapes and compiles once. Which prompts a step takes is a pure function of (seed, step) — seeded
permutations of the prompt set, epoch after epoch — and so is the sampling key, so a resumed run draws
exactly the rollouts the uninterrupted run would have.

In `update_batch`, a row is its prompt, its completion (stop token included when one was emitted; a row
cut at max_new_tokens keeps what it has) and padding; `loss_mask[b, t]` is 1 on completion tokens (t in
[prompt_length, prompt_length + num_generated)), the layout of supervised fine-tuning batches, so
training/loss.py's `batch_target_mask(batch, 1, masked=True)` picks the predictions to train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

import inference
import models
from data import prompts as prompts_lib
from data import tokenizers
from inference import prompts as prompt_ids


@dataclasses.dataclass(frozen=True)
class Prompts:
  records: list[dict]  # {"prompt", "answer", ...} as loaded (data/prompts.py)
  texts: list[str]  # each record's prompt rendered with the run's template
  ids: np.ndarray  # int32 [N, Tp]: token ids, right-padded with the tokenizer's pad id
  lengths: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return len(self.records)


def encode_prompts(records: Sequence[dict], tokenizer: tokenizers.Tokenizer, template: str) -> Prompts:
  """Renders and tokenizes every record once (BOS first when the tokenizer has one, as training starts a
  document), padded to the longest prompt of the set."""
  if not records:
    raise ValueError("no prompts to roll out")
  texts = [prompts_lib.render(template, r["prompt"]) for r in records]
  ids, lengths = prompt_ids.encode_prompts(tokenizer, texts)
  return Prompts(list(records), texts, ids, lengths)


def step_indices(step: int, per_step: int, num_prompts: int, seed: int) -> np.ndarray:
  """int64 [per_step]: the prompts of (0-based) step `step`: positions [step·per_step, (step+1)·per_step)
  of the stream of seeded permutations of range(num_prompts), one permutation per epoch."""
  if num_prompts < 1 or per_step < 1:
    raise ValueError(f"need prompts and prompts per step >= 1, got {num_prompts} and {per_step}")
  out = np.empty(per_step, np.int64)
  for i, position in enumerate(range(step * per_step, (step + 1) * per_step)):
    epoch, offset = divmod(position, num_prompts)
    out[i] = _permutation(seed, epoch, num_prompts)[offset]
  return out


_PERMUTATIONS: dict = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  key = (seed, epoch, n)
  if key not in _PERMUTATIONS:
    if len(_PERMUTATIONS) > 4:  # a run walks through epochs in order: keep the last few only
      _PERMUTATIONS.clear()
    _PERMUTATIONS[key] = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
  return _PERMUTATIONS[key]


@dataclasses.dataclass(frozen=True)
class Rollout:
  indices: np.ndarray  # int [N]: the prompt of each row (into Prompts)
  tokens: np.ndarray  # int32 [N, S]: prompt, completion, padding (S = Tp + max_new_tokens)
  prompt_lengths: np.ndarray  # int32 [N]
  num_generated: np.ndarray  # int32 [N]: completion tokens, the stop token included
  finished: np.ndarray  # bool [N]: the row emitted EOS
  completions: list[str]  # decoded completions, cut before EOS


def sample(model: models.Transformer, prompts: Prompts, indices: np.ndarray, tokenizer: tokenizers.Tokenizer, *,
           max_new_tokens: int, temperature: float, top_p: float = 1.0, key, execution=None) -> Rollout:
  """One completion per row of `indices` (repeat an index G times for a group), sampled in one compiled
  `generate_full` call (temperature 0: greedy)."""
  indices = np.asarray(indices)
  ids, lengths = prompts.ids[indices], prompts.lengths[indices]
  stop = (tokenizer.eos_id,)
  gen = inference.generate_full(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=key,
                                stop_tokens=stop, pad_id=tokenizer.pad_id, prompt_lengths=lengths,
                                execution=execution)
  tokens, num, finished = jax.device_get((gen.tokens, gen.num_generated, gen.finished))
  completions = [tokenizer.decode(c) for c in prompt_ids.completion_ids(tokens, lengths, max_new_tokens, stop)]
  return Rollout(indices, np.asarray(tokens, np.int32), np.asarray(lengths, np.int32), np.asarray(num, np.int32),
                 np.asarray(finished), completions)


def update_batch(rollout: Rollout) -> dict[str, np.ndarray]:
  """The rollout as a packed batch for the policy's forward pass (see the module docstring)."""
  n, s = rollout.tokens.shape
  t = np.arange(s)[None, :]
  end = (rollout.prompt_lengths + rollout.num_generated)[:, None]
  real = t < end
  completion = (t >= rollout.prompt_lengths[:, None]) & real
  return {
      "tokens": rollout.tokens,
      "positions": np.broadcast_to(t, (n, s)).astype(np.int32),
      "segment_ids": real.astype(np.int32),
      "loss_mask": completion.astype(np.int32),
  }
