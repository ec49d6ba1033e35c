r"""Writes a small synthetic SFT task as prompt/completion JSONL: DIR/train.jsonl and DIR/test.jsonl.

  python -m tools.make_sft_task --task=reverse --out_dir=/tmp/sft_reverse
  python -m tools.make_sft_task --task=arithmetic --out_dir=/tmp/sft_arith --train=20000 --test=200

then train with `--config.data.dataset=sft_jsonl --config.data.sft_files=/tmp/sft_reverse/train.jsonl
--config.data.sft_eval_files=/tmp/sft_reverse/test.jsonl`.

Every prompt starts with 4-8 noise characters (from NOISE: no letters, digits, spaces or + - * =) that
the completion does not depend on, so a model must learn to read past them:

  reverse     {"prompt": "%<?@~ reverse kitten=", "completion": "nettik"}
  upper       {"prompt": "#/:^ upper kitten=", "completion": "KITTEN"}
  arithmetic  {"prompt": "!_;|&$ 37+48=", "completion": "85"}   (data/arithmetic.py problems)

Words are 3-6 random lowercase letters. Test words (problems) never occur in train: held out, so test
accuracy measures the rule, not memory. Lines are at most 31 bytes with the EOS (fits seq_len 128 with
the byte tokenizer several times over). Deterministic given (task, sizes, seed).
"""

import json
import os
import random

from absl import app
from absl import flags

TASKS = ("reverse", "upper", "arithmetic")
NOISE = "!#$%&?@^_~:;<>/|"



def define_flags() -> None:
  """The command line's flags, defined only when run as a program: importing this module (tests do)
  must not add required flags to the process's absl flags."""
  flags.DEFINE_enum("task", None, list(TASKS), "Which task.", required=True)
  flags.DEFINE_string("out_dir", None, "Directory for train.jsonl and test.jsonl.", required=True)
  flags.DEFINE_integer("train", 20000, "Train examples.")
  flags.DEFINE_integer("test", 200, "Test examples (distinct, held-out words or problems).")
  flags.DEFINE_integer("seed", 0, "Random seed.")


def _word(rng: random.Random) -> str:
  return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def _noise(rng: random.Random) -> str:
  return "".join(rng.choice(NOISE) for _ in range(rng.randint(4, 8)))


def make_task(task: str, train: int, test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
  """(train, test) examples {"prompt", "completion"}; test words/problems are absent from train."""
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
  rng = random.Random(f"sft_task/{task}/{seed}")
  if task == "arithmetic":
    from data import arithmetic  # pylint: disable=g-import-not-at-top
    problems = arithmetic.generate_problems(test + train, seed=seed)  # distinct: test first
    make = lambda p: {"prompt": f"{_noise(rng)} {p}", "completion": str(arithmetic.answer(p))}
    return [make(p) for p in problems[test:]], [make(p) for p in problems[:test]]

  held_out: dict[str, None] = {}
  while len(held_out) < test:
    held_out.setdefault(_word(rng), None)
  train_words = []
  while len(train_words) < train:
    word = _word(rng)
    if word not in held_out:
      train_words.append(word)
  answer = (lambda w: w[::-1]) if task == "reverse" else str.upper
  make = lambda w: {"prompt": f"{_noise(rng)} {task} {w}=", "completion": answer(w)}
  return [make(w) for w in train_words], [make(w) for w in held_out]


def write_jsonl(path: str, examples: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for example in examples:
      f.write(json.dumps(example) + "\n")


def write_task(task: str, out_dir: str, train: int = 20000, test: int = 200, seed: int = 0) -> list[str]:
  """Writes out_dir/train.jsonl and out_dir/test.jsonl; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "test.jsonl")]
  for path, examples in zip(paths, make_task(task, train, test, seed)):
    write_jsonl(path, examples)
  return paths


def main(argv):
  del argv
  f = flags.FLAGS
  for path in write_task(f.task, f.out_dir, f.train, f.test, f.seed):
    print(path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
