"""Prompt records for reinforcement learning (GRPO) and generation tasks: `{"prompt", "answer", ...}`.

  records = prompts.load_prompts(config.data, "train")           # [{"prompt": "37+48=", "answer": "85"}, ...]
  text = prompts.render(prompts.R1_ZERO_TEMPLATE, records[0]["prompt"])

A record is the raw prompt (before any template) and the answer the rule-based rewards check it against
(training/rewards.py). The model sees `render(template, record["prompt"])`.

Templates. `render(template, prompt)` requires the text `{prompt}` exactly once in the template and
replaces it (plain str.replace: every other brace is literal, so templates may contain JSON or LaTeX).
`DEFAULT_TEMPLATE` is the prompt alone; `R1_ZERO_TEMPLATE` is a DeepSeek-R1-Zero-style instruction whose
text ends with "Assistant: <think>", so the model continues inside its reasoning block and is expected to
close it and answer as `</think> <answer> … </answer>` (the `format` reward checks exactly that).

Sources, in this order:
1. `data_config.prompt_files` set (comma-separated globs; `~` expanded, `**` recursive): JSONL files,
   read in sorted order of their absolute paths (a file matched twice is read once). Each non-blank line
   is one record, a JSON object with "prompt" (a string with a non-whitespace character) and "answer" (a
   string, possibly empty); other keys are kept in the record. A line that is not valid UTF-8 or JSON, not
   an object, or lacks either key or has the wrong type is a ValueError naming `file:line`; a glob matching
   no file is a ValueError naming the glob. Splits: with `prompt_eval_files` set (globs, same format),
   train = prompt_files and validation = prompt_eval_files. Otherwise line n of a file goes to validation
   when `data.split.is_validation(f"{basename}:{n}", VALIDATION_PERCENT)` (~5 %); as in data/sft.py, if that
   leaves validation empty and there are >= 2 records, the last record read goes to validation, and if it
   leaves train empty, the first goes to train (unlike sft, also when it is the only record: a one-prompt
   file trains). Only `train` and `validation` exist here.
2. Otherwise `data_config.dataset` must be `arithmetic` or `arithmetic/<config>` (`d2`, the default, or
   `d3`): the problems of data/arithmetic.py, built into `data_config.data_dir` on first use, as
   {"prompt": "37+48=", "answer": "85"}; splits train | validation | test (fixed and disjoint).
Anything else is a ValueError (GRPO prompts come from prompt_files or the arithmetic dataset), as is
`prompt_eval_files` without `prompt_files`.

`count` keeps the first N records of the split (file order, or the dataset's fixed order); None = all.
A split with no record is a ValueError. No TFDS slicing: the split is one of the names above.
"""

from __future__ import annotations

import os

from data import arithmetic
from data import sft
from data import sources
from data import split as split_lib

VALIDATION_PERCENT = 5.0  # of prompt_files lines held out when prompt_eval_files is empty

DEFAULT_TEMPLATE = "{prompt}"
# DeepSeek-R1-Zero-style: the instruction names the tags; ending inside <think> makes the first thing the
# model writes its reasoning, so the format is learned from the reward rather than from a cold start.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process and then gives the answer. The reasoning "
    "is enclosed in <think> </think> tags and the answer in <answer> </answer> tags, i.e. "
    "<think> reasoning here </think> <answer> answer here </answer>.\n"
    "User: {prompt}\n"
    "Assistant: <think>")

_PLACEHOLDER = "{prompt}"


def render(template: str, prompt: str) -> str:
  """`template` with its single `{prompt}` replaced by `prompt` (other braces are literal)."""
  n = template.count(_PLACEHOLDER)
  if n != 1:
    raise ValueError(f"a prompt template must contain {_PLACEHOLDER} exactly once, found {n} in {template!r}")
  return template.replace(_PLACEHOLDER, prompt)


def resolve_files(patterns: str, key: str = "prompt_files") -> list[str]:
  """Sorted, distinct files matched by comma-separated globs (data/sft.py's rule); ValueError naming a
  glob that matches none."""
  return sft.resolve_files(
      patterns, none_message=f"data_config.{key} names no file: set it to a comma-separated list of JSONL globs.",
      label=key)


def check_record(record) -> None:
  """ValueError unless `record` is a prompt record (see the module docstring)."""
  if not isinstance(record, dict):
    raise ValueError(f"a prompt record must be a JSON object, got {type(record).__name__}")
  for key in ("prompt", "answer"):
    if key not in record:
      raise ValueError(f'"{key}" is missing (a prompt record is {{"prompt": str, "answer": str}})')
    if not isinstance(record[key], str):
      raise ValueError(f'"{key}" must be a string, got {type(record[key]).__name__}')
  if not record["prompt"].strip():
    raise ValueError('"prompt" is empty')


def read_prompts(path: str) -> list[tuple[str, int, dict]]:
  """(path, line number from 1, record) for each non-blank line of a prompt JSONL file."""
  return sft.read_examples(path, check=check_record)


def split_records(records: list[tuple[str, int, dict]], split: str) -> list[tuple[str, int, dict]]:
  """The records of `split` under the held-out rule of the module docstring (data/sft.py's rule)."""
  held = [split_lib.is_validation(f"{os.path.basename(path)}:{n}", VALIDATION_PERCENT) for path, n, _ in records]
  # Never leave a split empty when there is something to give it: a small file still validates.
  if len(records) >= 2 and not any(held):
    held[-1] = True
  if records and all(held):  # training needs prompts more than validation does: even a single one
    held[0] = False
  return [r for r, h in zip(records, held) if h == (split == "validation")]


def _from_files(split: str, files: str, eval_files: str) -> list[dict]:
  if split not in ("train", "validation"):
    raise ValueError(f"prompt_files give splits 'train' and 'validation', got {split!r}.")
  if eval_files:
    key, patterns = ("prompt_eval_files", eval_files) if split == "validation" else ("prompt_files", files)
    return [r for path in resolve_files(patterns, key) for _, _, r in read_prompts(path)]
  records = [r for path in resolve_files(files) for r in read_prompts(path)]
  return [r for _, _, r in split_records(records, split)]


def _from_arithmetic(data_config, split: str, count: int | None) -> list[dict]:
  dataset = data_config.get("dataset", "") or ""
  base, _, config = dataset.partition("/")
  if base != "arithmetic":
    raise ValueError(f"GRPO prompts come from data_config.prompt_files (JSONL of {{\"prompt\", \"answer\"}}) "
                     f"or the arithmetic dataset (dataset='arithmetic' or 'arithmetic/d3'); got dataset "
                     f"{dataset!r} and no prompt_files.")
  config = config or "d2"
  if config not in sources.ARITHMETIC_CONFIGS:
    raise ValueError(f"unknown arithmetic config {config!r}; expected one of {sources.ARITHMETIC_CONFIGS}.")
  if split not in ("train", "validation", "test"):
    raise ValueError(f"the arithmetic dataset has splits train, validation and test (no slicing), got {split!r}.")
  problems = arithmetic.load_problems(split, count, data_config.get("data_dir", "") or "", config)
  return [{"prompt": p["problem"], "answer": p["answer"]} for p in problems]


def load_prompts(data_config, split: str, count: int | None = None) -> list[dict]:
  """The prompt records of `split` (see the module docstring); the first `count` if given."""
  if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
    raise ValueError(f"count must be a positive int or None, got {count!r}.")
  files = (data_config.get("prompt_files", "") or "").strip()
  eval_files = (data_config.get("prompt_eval_files", "") or "").strip()
  if files:
    records = _from_files(split, files, eval_files)[:count]
    source = "prompt_files" if not eval_files or split == "train" else "prompt_eval_files"
  elif eval_files:
    raise ValueError("data_config.prompt_eval_files is set but prompt_files is not: set prompt_files to the "
                     "training prompts (or clear prompt_eval_files).")
  else:
    records = _from_arithmetic(data_config, split, count)
    source = f"dataset {data_config.get('dataset')!r}"
  if not records:
    raise ValueError(f"no prompt records in split {split!r} of {source}.")
  return records
