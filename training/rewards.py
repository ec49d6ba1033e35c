"""Rule-based rewards for GRPO (DeepSeek-R1-Zero style): a registry, a config spec, and batch scoring.

  rewards_list = rewards.parse("arithmetic_exact:1.0,format:0.2")
  total, per_name, correct = rewards.score(rewards_list, prompts, completions, examples)

  @rewards.register("short", correctness=False)        # or rewards.register("short", fn)
  def short(prompt, completion, example): return float(len(completion) < 200)

A reward function is `fn(prompt: str, completion: str, example: dict) -> float`: `prompt` is the rendered
prompt text the model saw (data/prompts.py `render`), `completion` the generated text (cut at EOS) and
`example` the prompt record `{"prompt": str, "answer": str, ...}` the prompt was rendered from.

The answer text. If the completion contains an `<answer>…</answer>` block (the tags written exactly so,
lowercase; content may span lines), the answer text is the content of the first such block; otherwise
(no block, or an `<answer>` never closed) it is the whole completion. So the correctness rewards score
both template-free completions ("85") and R1-Zero ones ("<think>…</think> <answer>85</answer>").

Built-in rewards (each returns 1.0 or 0.0):
  arithmetic_exact  (correctness)  1.0 if `arithmetic.first_number(answer text)` equals
                    example["answer"] stripped of surrounding whitespace: data/arithmetic.py's rule (the
                    leftmost `-?\\d+(\\.\\d+)?`, exactly, so "085", "85.0" or "8 5" do not match "85").
  exact_match       (correctness)  1.0 if the answer text stripped == example["answer"] stripped.
  canonical_number  1.0 if the answer text's first number (the `arithmetic_exact` reading) is an
                    integer written canonically — no leading zeros, no decimal part, no "-0" — whatever
                    its value, else 0.0 (also 0.0 with no number). A format reward for arithmetic
                    answers: right or wrong, say it as the exact-match rule can read it.
  format            1.0 if the completion follows the R1-Zero template, else 0.0. The text checked is
                    the completion, with "<think>" put in front of it when the rendered prompt ends with
                    "<think>" (ignoring trailing whitespace): a template such as data/prompts.py's
                    R1_ZERO_TEMPLATE opens the think block for the model, which then continues inside it.
                    That text, stripped of surrounding whitespace, must be exactly
                      <think> A </think> W <answer> B </answer>
                    where W is optional whitespace and A, B are any text (possibly empty, possibly
                    multi-line), and each of the four tags <think> </think> <answer> </answer> must occur
                    exactly once in it: nothing before <think>, nothing after </answer>, no nesting or
                    repetition. Tags are case-sensitive.
A missing example["answer"] is an error (the reward raises; `score` reports it), not a 0.

Registry. `register(name, fn, *, correctness=False)` adds a reward (or, without fn, returns a decorator);
names match `[A-Za-z_][A-Za-z0-9_-]*` (no '.', ':' or ','), and a name registered twice is a ValueError.
`correctness` marks rewards that say whether the answer is right: `score` averages them into `correct`
(the accuracy GRPO logs), separate from shaping rewards such as `format`.

Dotted names. A name containing a '.' is a Python path `package.module.function`: everything before the
last '.' is imported with importlib and the last part is taken from it; a module that cannot be imported,
a missing attribute or a non-callable is a ValueError naming the path. The function is a correctness
reward only if its module registered that same function object with correctness=True.

Spec. `parse("name[:weight],name[:weight],...")`: items are separated by ',', the weight (a float,
default 1.0) follows the LAST ':' of an item (so a path never needs escaping), whitespace around names,
weights and items is ignored. Negative weights (penalties) and 0 (computed and logged, not rewarded)
are allowed. ValueError (with the known names) on: an empty spec, an empty item ("a,,b", a trailing ','),
an unknown name, an unparseable or non-finite weight, a name given twice.

Scoring. `score` calls every reward on every row: total[i] = Σ weight · value, per_name[name][i] = value
(unweighted), correct[i] = mean of the correctness rewards' values (None when none is configured); all
float32 [N]. A reward that raises, returns something float() rejects, or returns a non-finite value is
a ValueError naming the reward, the row and the completion: a broken reward must stop the run, since
silently scoring it 0 would train on a wrong signal.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from data import arithmetic

RewardFn = Callable[[str, str, Mapping], float]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)  # non-greedy: the first block only
_FORMAT = re.compile(r"\A<think>.*</think>\s*<answer>.*</answer>\Z", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_CANONICAL = re.compile(r"^(0|-?[1-9]\d*)$")  # an integer as Python's str(int) writes it (no "-0")
_MAX_SHOWN = 300  # characters of a completion quoted in an error (completions can be thousands long)


@dataclasses.dataclass(frozen=True)
class Reward:
  """One configured reward: `fn` scored with `weight` into the total; `correctness` as registered."""
  name: str
  weight: float
  fn: RewardFn
  correctness: bool = False


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: RewardFn
  correctness: bool


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, fn: RewardFn | None = None, *, correctness: bool = False):
  """Registers `fn` as reward `name` and returns it; without `fn`, a decorator that does so."""
  if fn is None:
    return lambda f: register(name, f, correctness=correctness)
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError(f"reward name {name!r} must match {_NAME.pattern} (dots name import paths; ':' and ',' "
                     "separate a spec)")
  if not callable(fn):
    raise ValueError(f"reward {name!r}: {fn!r} is not callable")
  if name in _REGISTRY:
    raise ValueError(f"reward {name!r} is already registered")
  _REGISTRY[name] = _Entry(fn, bool(correctness))
  return fn


def registered() -> list[str]:
  """The registered reward names, sorted."""
  return sorted(_REGISTRY)


def _known() -> str:
  return f"known rewards: {', '.join(registered())}, or a dotted path package.module.function"


def answer_text(completion: str) -> str:
  """The content of the completion's first <answer>…</answer> block, or the whole completion."""
  m = _ANSWER_BLOCK.search(completion)
  return m.group(1) if m else completion


@register("arithmetic_exact", correctness=True)
def arithmetic_exact(prompt: str, completion: str, example: Mapping) -> float:
  del prompt  # the answer is in the record: the rendered prompt may wrap the problem in instructions
  return 1.0 if arithmetic.first_number(answer_text(completion)) == example["answer"].strip() else 0.0


@register("exact_match", correctness=True)
def exact_match(prompt: str, completion: str, example: Mapping) -> float:
  del prompt
  return 1.0 if answer_text(completion).strip() == example["answer"].strip() else 0.0


@register("canonical_number")
def canonical_number(prompt: str, completion: str, example: Mapping) -> float:
  del prompt, example
  number = arithmetic.first_number(answer_text(completion))
  return 1.0 if number is not None and _CANONICAL.match(number) else 0.0


@register("format")
def format_reward(prompt: str, completion: str, example: Mapping) -> float:
  del example
  text = "<think>" + completion if prompt.rstrip().endswith("<think>") else completion
  text = text.strip()
  if any(text.count(tag) != 1 for tag in _TAGS):
    return 0.0
  return 1.0 if _FORMAT.match(text) else 0.0


def _resolve(name: str) -> _Entry:
  """The registry entry of `name`, importing a dotted path (see the module docstring)."""
  if "." not in name:
    if name not in _REGISTRY:
      raise ValueError(f"unknown reward {name!r}; {_known()}")
    return _REGISTRY[name]
  module_name, _, attr = name.rpartition(".")
  if not module_name or not attr:
    raise ValueError(f"reward {name!r} is not a dotted path package.module.function; {_known()}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:  # incl. a module whose own imports fail: the message says which
    raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e}); {_known()}") from None
  if not hasattr(module, attr):
    raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}; {_known()}")
  fn = getattr(module, attr)
  if not callable(fn):
    raise ValueError(f"reward {name!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
  # A function its module registered keeps its registered flag (the module was just imported, so any
  # register() call at import time has run).
  correctness = any(e.fn is fn and e.correctness for e in _REGISTRY.values())
  return _Entry(fn, correctness)


def parse(spec: str) -> list[Reward]:
  """`"name[:weight],..."` (see the module docstring) → the configured rewards, in spec order."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"empty reward spec {spec!r}: give e.g. 'arithmetic_exact:1.0,format:0.2'; {_known()}")
  out: list[Reward] = []
  for item in spec.split(","):
    item = item.strip()
    if not item:
      raise ValueError(f"reward spec {spec!r} has an empty item; {_known()}")
    name, weight_text = item, None
    if ":" in item:
      name, _, weight_text = item.rpartition(":")
      name, weight_text = name.strip(), weight_text.strip()
    if not name:
      raise ValueError(f"reward spec item {item!r} has no name; {_known()}")
    weight = 1.0
    if weight_text is not None:
      try:
        weight = float(weight_text)
      except ValueError:
        raise ValueError(f"reward {name!r}: weight {weight_text!r} is not a number; {_known()}") from None
      if not math.isfinite(weight):
        raise ValueError(f"reward {name!r}: weight {weight_text!r} is not finite; {_known()}")
    if any(r.name == name for r in out):
      raise ValueError(f"reward {name!r} appears twice in {spec!r}; {_known()}")
    entry = _resolve(name)
    out.append(Reward(name, weight, entry.fn, entry.correctness))
  return out


def _shown(completion: str) -> str:
  if len(completion) <= _MAX_SHOWN:
    return repr(completion)
  return f"{completion[:_MAX_SHOWN]!r}… ({len(completion)} characters)"


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str],
          examples: Sequence[Mapping]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
  """(total, per_name, correct) for N rows (see the module docstring); all float32 [N]."""
  if not rewards:
    raise ValueError(f"no rewards to score with; {_known()}")
  names = [r.name for r in rewards]
  if len(set(names)) != len(names):
    raise ValueError(f"rewards {names} repeat a name: per-reward values are keyed by name")
  n = len(completions)
  if len(prompts) != n or len(examples) != n:
    raise ValueError(f"score needs one prompt, completion and example per row; got {len(prompts)} prompts, "
                     f"{n} completions, {len(examples)} examples")
  per_name = {}
  total = np.zeros(n, np.float64)  # summed in float64, returned as float32
  for r in rewards:
    values = np.zeros(n, np.float64)
    for i, (prompt, completion, example) in enumerate(zip(prompts, completions, examples)):
      try:
        value = float(r.fn(prompt, completion, example))
      except Exception as e:  # pylint: disable=broad-except  (any failure of user code is reported alike)
        raise ValueError(f"reward {r.name!r} failed on row {i} ({type(e).__name__}: {e}); completion "
                         f"{_shown(completion)}") from e
      if not math.isfinite(value):
        raise ValueError(f"reward {r.name!r} returned {value} on row {i}; completion {_shown(completion)}")
      values[i] = value
    per_name[r.name] = values.astype(np.float32)
    total += r.weight * values
  correctness = [per_name[r.name] for r in rewards if r.correctness]
  correct = np.mean(correctness, axis=0, dtype=np.float64).astype(np.float32) if correctness else None
  return total.astype(np.float32), per_name, correct
