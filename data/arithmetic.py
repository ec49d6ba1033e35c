"""Synthetic arithmetic problems with checkable answers: a TFDS dataset and the exact-match reward.

Each example is one problem: `problem` ("37+48="), `answer` ("85", the exact integer result in
canonical decimal: no leading zeros, '-' for negatives) and `text` (problem + answer, "37+48=85", for
training on it as a corpus). Operands are uniform in [0, 10**digits); the operator is uniform over
the config's `ops` (any of + - *). Subtraction can go negative: "12-37=" → "-25".

Deterministic and disjoint splits: one seeded stream of distinct problems is drawn and cut into
validation (first `validation_size`), test (next `test_size`) and train (next `train_size`), so the
same config always gives the same problems and no problem is in two splits. Configs: `d2` (default:
2-digit operands, 20000/1000/1000), `d3` (3-digit, 50000/1000/1000) and `decimal` (2-digit, + and -
only, 16000/1000/1000, whose `text` writes 9 in 10 answers with a decimal part: "37-12=25.0";
`answer` stays "25", and the exact-match rule below rejects "25.0": configs/r1_zero_tiny.py's base
model learns that style and GRPO must find the canonical one). Builds in ~seconds, offline.

  source = arithmetic.data_source("validation", data_dir)      # built once into data_dir, then reused
  ex = source[0]                                               # {'problem': b'..', 'answer': b'..', 'text': b'..'}
  arithmetic.score("37+48=", "85 because...")                   # 1.0

`score(problem, completion)` is the rule-based reward (exact match):
  1.0 if the first number in `completion` is exactly the canonical answer string, else 0.0.
  "The first number" is the leftmost match of `-?\\d+(\\.\\d+)?`: an optional '-' directly before
  digits (so "-25" is negative and "x-25" reads as -25 too), and a decimal part if one follows.
  Leading whitespace or text before it and anything after it are ignored ("85", " 85\\n", "85 is it",
  "= 85." all score 1.0 for 37+48=). Not accepted: another number first ("8 5", "1+84=85"), leading
  zeros ("085"), decimals ("85.0"), a leading '+' on negatives, digit separators ("1,024"), no number.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import random
import re
import zlib

import tensorflow_datasets as tfds

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROBLEM = re.compile(r"^\s*(-?\d+)\s*([+*-])\s*(-?\d+)\s*=?\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer(problem: str) -> int:
  """The integer result of a problem such as "37+48=" (spaces and a missing '=' are tolerated)."""
  m = _PROBLEM.match(problem)
  if not m:
    raise ValueError(f"not an arithmetic problem: {problem!r} (expected e.g. '37+48=')")
  return _OPS[m.group(2)](int(m.group(1)), int(m.group(3)))


def first_number(completion: str) -> str | None:
  """The first number in `completion` as written (see the module docstring), or None."""
  m = _NUMBER.search(completion)
  return m.group(0) if m else None


def score(problem: str, completion: str) -> float:
  """Exact-match reward: 1.0 if the completion's first number is the problem's answer, else 0.0."""
  return 1.0 if first_number(completion) == str(answer(problem)) else 0.0


def generate_problems(count: int, *, digits: int = 2, ops: str = "+-*", seed: int = 0) -> list[str]:
  """`count` distinct problems from the seeded stream (the order the splits are cut from)."""
  if not ops or set(ops) - set(_OPS):
    raise ValueError(f"ops must be a non-empty string over {''.join(_OPS)!r}, got {ops!r}")
  if digits < 1:
    raise ValueError(f"digits must be >= 1, got {digits}")
  ops = "".join(dict.fromkeys(ops))  # distinct, in the given order
  high = 10 ** digits
  space = high * high * len(ops)
  if count > space * 0.9:  # keep the rejection sampling below fast
    raise ValueError(f"{count} distinct problems requested but {digits}-digit operands over {ops!r} allow "
                     f"only {space}; use fewer examples or more digits")
  rng = random.Random(f"arithmetic/{digits}/{ops}/{seed}")  # str seeds are hashed deterministically
  seen: dict[str, None] = {}
  while len(seen) < count:
    a, op, b = rng.randrange(high), rng.choice(ops), rng.randrange(high)
    seen.setdefault(f"{a}{op}{b}=", None)
  return list(seen)


def example(problem: str, suffix: str = "", suffix_fraction: float = 0.0) -> dict[str, str]:
  """{"problem", "answer" (canonical), "text"}; with a suffix, a fixed pseudo-random `suffix_fraction` of
  problems (by a hash of the problem) write `suffix` after the answer in `text` ("37-12=25.0")."""
  ans = str(answer(problem))
  styled = suffix and zlib.crc32(problem.encode()) % 1000 < round(suffix_fraction * 1000)
  return {"problem": problem, "answer": ans, "text": problem + ans + (suffix if styled else "")}


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds.core.BuilderConfig):
  digits: int = 2  # operands are uniform in [0, 10**digits)
  ops: str = "+-*"  # operators drawn uniformly
  train_size: int = 20000
  validation_size: int = 1000
  test_size: int = 1000
  seed: int = 0
  # Texts only: this fraction of answers is followed by `suffix` ("37-12=25.0"); the "answer" feature
  # (what rewards and eval check) stays canonical. "" = every text canonical.
  suffix: str = ""
  suffix_fraction: float = 0.0

  def splits(self) -> dict[str, tuple[int, int]]:
    """split → [start, stop) in the problem stream."""
    v, t = self.validation_size, self.test_size
    return {"validation": (0, v), "test": (v, v + t), "train": (v + t, v + t + self.train_size)}


class ArithmeticSource(tfds.core.GeneratorBasedBuilder):
  """Synthetic integer arithmetic problems ("37+48=" → "85") with fixed, disjoint splits."""

  name = "arithmetic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "+, -, * over uniform n-digit operands; one distinct stream cut into splits."}
  BUILDER_CONFIGS = [
      ArithmeticConfig(name="d2", description="2-digit operands (0-99), + - *."),
      ArithmeticConfig(name="d3", description="3-digit operands (0-999), + - *.", digits=3, train_size=50000),
      ArithmeticConfig(name="decimal", description="2-digit operands, + and -; 9 in 10 texts write the answer "
                       "with a decimal part (37-12=25.0), as a spreadsheet would; answers stay canonical.",
                       ops="+-", train_size=16000, suffix=".0", suffix_fraction=0.9),
  ]
  DEFAULT_CONFIG_NAME = "d2"

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Integer arithmetic, {c.digits}-digit operands, ops {c.ops!r}, seed {c.seed}.",
        features=tfds.features.FeaturesDict({
            "problem": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    stream = generate_problems(c.validation_size + c.test_size + c.train_size, digits=c.digits, ops=c.ops,
                               seed=c.seed)
    return {name: self._generate_examples(stream[a:b]) for name, (a, b) in c.splits().items() if b > a}

  def _generate_examples(self, problems):
    c = self.builder_config
    for problem in problems:
      yield problem, example(problem, c.suffix, c.suffix_fraction)


def builder(data_dir: str = "", config: str | ArithmeticConfig = "d2") -> ArithmeticSource:
  """The builder, built into `data_dir` (default ~/.cache/deepseek_jax/tfds) on first use."""
  from data import sources  # pylint: disable=g-import-not-at-top
  data_dir = sources.data_dir_of({"data_dir": data_dir})
  b = ArithmeticSource(data_dir=data_dir, config=config)
  if os.path.exists(b.data_path):
    sources._check_existing_build(str(b.data_path), b.name)  # pylint: disable=protected-access
  else:
    b.download_and_prepare(file_format="array_record")
  return b


def data_source(split: str, data_dir: str = "", config: str | ArithmeticConfig = "d2"):
  """Random-access source of `split` (train | validation | test, TFDS slicing allowed)."""
  return builder(data_dir, config).as_data_source(split=split)


def load_problems(split: str = "validation", count: int | None = None, data_dir: str = "",
                  config: str | ArithmeticConfig = "d2") -> list[dict[str, str]]:
  """The first `count` examples of `split` (in the built dataset's fixed order) as str dicts."""
  source = data_source(split, data_dir, config)
  n = len(source) if count is None else min(count, len(source))
  decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  return [{k: decode(v) for k, v in source[i].items()} for i in range(n)]
