"""Task evaluations: generate answers to problems with checkable results and score them.

  result = tasks.arithmetic(model, tok, num_examples=100, data_dir=config.data.data_dir)
  result["accuracy"], result["examples"][:3]
  results = tasks.run(["arithmetic"], model, tok, config, num_examples=100)   # what eval.py --tasks does

`arithmetic`: greedy completions of N validation problems of data/arithmetic.py ("37+48=") in fixed
size batches (prompts right-padded to one length, so the whole task compiles once), each scored by
`arithmetic.score` (exact match of the first number); accuracy is the mean score.
"""

from __future__ import annotations

from collections.abc import Sequence

import models
from data import arithmetic as arithmetic_data
from data import tokenizers

from evaluation import sample


def score_completions(problems: Sequence[dict], completions: Sequence[str]) -> dict:
  scores = [arithmetic_data.score(p["problem"], c) for p, c in zip(problems, completions)]
  return {
      "accuracy": sum(scores) / max(len(scores), 1),
      "num_examples": len(scores),
      "examples": [{"problem": p["problem"], "answer": p["answer"], "completion": c, "score": s}
                   for p, c, s in zip(problems, completions, scores)],
  }


def arithmetic(model: models.Transformer, tokenizer: tokenizers.Tokenizer, *, num_examples: int = 100,
               batch_size: int = 32, max_new_tokens: int = 8, split: str = "validation", data_dir: str = "",
               dataset_config: str = "d2", problems: Sequence[dict] | None = None) -> dict:
  """Exact-match accuracy of greedy answers to `num_examples` problems of `split` (or `problems`)."""
  if problems is None:
    problems = arithmetic_data.load_problems(split, num_examples, data_dir, dataset_config)
  problems = list(problems)
  if not problems:
    raise ValueError("no arithmetic problems to evaluate")
  prompt_len = max(len(sample.encode_prompts(tokenizer, [p["problem"]])[0][0]) for p in problems)
  completions = []
  for start in range(0, len(problems), batch_size):
    chunk = [p["problem"] for p in problems[start:start + batch_size]]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one batch shape: one compilation
    out = sample.complete(model, tokenizer, padded, max_new_tokens=max_new_tokens, pad_to=prompt_len)
    completions.extend(out[:len(chunk)])
  return score_completions(problems, completions)


TASKS = {"arithmetic": arithmetic}


def run(names: Sequence[str], model: models.Transformer, tokenizer: tokenizers.Tokenizer, config, *,
        num_examples: int = 100, batch_size: int = 32) -> dict[str, dict]:
  """{task: result} for each named task; data builds into the run's data dir."""
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
  data_dir = config.data.get("data_dir", "")
  return {name: TASKS[name](model, tokenizer, num_examples=num_examples, batch_size=batch_size, data_dir=data_dir)
          for name in names}
