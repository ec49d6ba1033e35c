"""Task evaluations: generate answers to problems with checkable results and score them.

  result = tasks.arithmetic(model, tok, num_examples=100, data_dir=config.data.data_dir)
  result["accuracy"], result["examples"][:3]
  results = tasks.run(["arithmetic"], model, tok, config, num_examples=100)   # what eval.py --tasks does

`arithmetic`: greedy completions of N validation problems of data/arithmetic.py (the run's own
`arithmetic/<config>` dataset if it has one, else d2; "37+48=", shown through
the run's `data.prompt_template`, as GRPO showed them in training) in fixed size batches (prompts right-padded to one length, so the whole task compiles once), each scored by
`arithmetic.score` (exact match of the first number); accuracy is the mean score.
`exact_match`: greedy completions of the prompts of a JSONL file of supervised fine-tuning lines
(`{"prompt", "completion"}` or `{"messages"}`, rendered as training renders them), each scored 1 when
it equals the expected completion after stripping surrounding whitespace.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import models
from data import arithmetic as arithmetic_data
from data import chat
from data import prompts as prompts_lib
from data import sft as sft_data
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
               dataset_config: str = "d2", problems: Sequence[dict] | None = None,
               template: str = prompts_lib.DEFAULT_TEMPLATE) -> dict:
  """Exact-match accuracy of greedy answers to `num_examples` problems of `split` (or `problems`), each
  shown to the model as `prompts_lib.render(template, problem)` (a run's data.prompt_template)."""
  if problems is None:
    problems = arithmetic_data.load_problems(split, num_examples, data_dir, dataset_config)
  problems = list(problems)
  if not problems:
    raise ValueError("no arithmetic problems to evaluate")
  ids, lengths = sample.encode_prompts(tokenizer, [prompts_lib.render(template, p["problem"]) for p in problems])
  prompts = [row[:n] for row, n in zip(ids, lengths)]
  return score_completions(problems, greedy_completions(model, tokenizer, prompts, batch_size, max_new_tokens))


def greedy_completions(model: models.Transformer, tokenizer: tokenizers.Tokenizer, prompts, batch_size: int,
                       max_new_tokens: int) -> list[str]:
  """Greedy completions of token-id prompts, cut at EOS, in batches of one shape (the last padded with
  copies of its first prompt, every prompt right-padded to the longest), so the task compiles once."""
  prompt_len = max(len(p) for p in prompts)
  completions = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    ids, lengths = sample.pad_prompts(padded, tokenizer.pad_id, pad_to=prompt_len)
    completions.extend(sample.complete_ids(model, tokenizer, ids, lengths, max_new_tokens=max_new_tokens)[:len(chunk)])
  return completions


def expected_completion(example: dict) -> str:
  """What an exact-match line asks for: its `completion`, or its last assistant turn's content."""
  if "completion" in example:
    return example["completion"]
  return [m["content"] for m in example["messages"] if m["role"] == "assistant"][-1]


def exact_match(model: models.Transformer, tokenizer: tokenizers.Tokenizer, task_file: str, *,
                template: str | None = None, num_examples: int | None = 100, batch_size: int = 32,
                max_new_tokens: int | None = None) -> dict:
  """Accuracy of greedy completions of a JSONL file's prompts, rendered as supervised fine-tuning
  renders them (data/chat.py, `template`), cut at EOS and compared with each line's completion after
  stripping surrounding whitespace. num_examples: the first N lines (None = all). max_new_tokens:
  default the longest expected completion's token count + 8."""
  records = sft_data.read_examples(task_file)[:num_examples]
  if not records:
    raise ValueError(f"{task_file} has no examples")
  prompts = [chat.prompt_tokens(example, tokenizer, template) for _, _, example in records]
  for (path, line, _), ids in zip(records, prompts):
    if len(ids) == 0:
      raise ValueError(f"{path}:{line}: the prompt encodes to no tokens: generation needs at least one")
  expected = [expected_completion(example) for _, _, example in records]
  if max_new_tokens is None:
    max_new_tokens = max(len(tokenizer.encode(e)) for e in expected) + 8
  completions = greedy_completions(model, tokenizer, prompts, batch_size, max_new_tokens)
  scores = [float(c.strip() == e.strip()) for c, e in zip(completions, expected)]
  return {
      "accuracy": sum(scores) / len(scores),
      "num_examples": len(scores),
      "task_file": os.path.abspath(task_file),
      "examples": [{"line": line, "prompt": tokenizer.decode(p), "expected": e, "completion": c, "score": sc}
                   for (_, line, _), p, e, c, sc in zip(records, prompts, expected, completions, scores)],
  }


TASKS = ("arithmetic", "exact_match")
NEEDS_TASK_FILE = ("exact_match",)


def run(names: Sequence[str], model: models.Transformer, tokenizer: tokenizers.Tokenizer, config, *,
        num_examples: int = 100, batch_size: int = 32, task_file: str | None = None) -> dict[str, dict]:
  """{task: result} for each named task; data builds into the run's data dir, and exact_match renders
  `task_file`'s prompts with the run's chat template."""
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
  results = {}
  for name in names:
    if name == "arithmetic":
      dataset, _, dataset_config = config.data.get("dataset", "").partition("/")
      results[name] = arithmetic(model, tokenizer, num_examples=num_examples, batch_size=batch_size,
                                 data_dir=config.data.get("data_dir", ""),
                                 dataset_config=(dataset_config or "d2") if dataset == "arithmetic" else "d2",
                                 template=config.data.get("prompt_template", prompts_lib.DEFAULT_TEMPLATE))
    else:
      if not task_file:
        raise ValueError("the exact_match task needs a task file (eval.py --task_file=F.jsonl)")
      results[name] = exact_match(model, tokenizer, task_file, template=chat.resolve_template(config.data),
                                  num_examples=num_examples, batch_size=batch_size)
  return results
