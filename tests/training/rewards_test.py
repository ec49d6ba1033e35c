"""training/rewards.py: the built-in rewards, the answer text, the registry, dotted paths, spec parsing, scoring."""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import numpy as np
import pytest

from training import rewards

R1_PROMPT = "User: 37+48=\nAssistant: <think>"  # ends inside <think>, like prompts.R1_ZERO_TEMPLATE
EX = {"prompt": "37+48=", "answer": "85"}


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch):
  """Each test registers into a copy: registrations do not leak between tests (names are one-time)."""
  monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))  # pylint: disable=protected-access


@pytest.fixture
def user_module(monkeypatch):
  """An importable module `rewards_user_mod` with a plain reward, a registered one and a non-callable."""
  mod = types.ModuleType("rewards_user_mod")
  mod.length = lambda prompt, completion, example: float(len(completion))
  mod.right = lambda prompt, completion, example: float(completion == example["answer"])
  mod.CONSTANT = 3
  monkeypatch.setitem(sys.modules, "rewards_user_mod", mod)
  rewards.register("user_right", mod.right, correctness=True)
  return mod


def _value(name, completion, prompt="37+48=", example=None):
  return rewards._REGISTRY[name].fn(prompt, completion, example or EX)  # pylint: disable=protected-access


# ---- the answer text ----

@pytest.mark.parametrize("completion, expected", [
    ("85", "85"),  # no block: the whole completion
    ("<think>7+8=15</think> <answer> 85 </answer>", " 85 "),
    ("<answer>1</answer><answer>2</answer>", "1"),  # the first block
    ("<answer>\n8\n5</answer>", "\n8\n5"),  # content spans lines
    ("<answer></answer>", ""),
    ("<think>x</think><answer>85", "<think>x</think><answer>85"),  # never closed: the whole completion
    ("<ANSWER>85</ANSWER> 9", "<ANSWER>85</ANSWER> 9"),  # tags are case-sensitive
])
def test_answer_text(completion, expected):
  assert rewards.answer_text(completion) == expected


# ---- built-ins ----

@pytest.mark.parametrize("completion, answer, expected", [
    ("85", "85", 1.0),
    (" 85 because 7+8=15", "85", 1.0),  # data/arithmetic.py's rule: the first number, trailing text ignored
    ("085", "85", 0.0),
    ("85.0", "85", 0.0),
    ("8 5", "85", 0.0),
    ("", "85", 0.0),
    ("-25", "-25", 1.0),
    ("85", " 85\n", 1.0),  # the expected answer is stripped
    ("<think>maybe 84</think> <answer>85</answer>", "85", 1.0),  # the number in the block, not the first one
    ("<think>85</think> <answer>84</answer>", "85", 0.0),
    ("<think>I say 84</think><answer>85", "85", 0.0),  # unclosed block: the whole completion, first number 84
])
def test_arithmetic_exact(completion, answer, expected):
  assert _value("arithmetic_exact", completion, example={"prompt": "p", "answer": answer}) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("Paris", "Paris", 1.0),
    ("  Paris\n", " Paris ", 1.0),  # both stripped
    ("paris", "Paris", 0.0),  # exact: case matters
    ("Paris.", "Paris", 0.0),
    ("<think>hmm</think>\n<answer> Paris </answer>", "Paris", 1.0),
    ("<think>Paris</think> <answer>Rome</answer>", "Paris", 0.0),
    ("", "", 1.0),
])
def test_exact_match(completion, answer, expected):
  assert _value("exact_match", completion, example={"prompt": "p", "answer": answer}) == expected


@pytest.mark.parametrize("prompt, completion, expected", [
    ("q", "<think>7+8=15</think> <answer>85</answer>", 1.0),
    ("q", "  <think>a\nb</think>\n\n<answer>\n85\n</answer>\n", 1.0),  # surrounding and middle whitespace
    ("q", "<think>a</think><answer>85</answer>", 1.0),  # the whitespace between the blocks is optional
    ("q", "<think></think><answer></answer>", 1.0),  # empty contents are allowed
    ("q", "85", 0.0),
    ("q", "ok <think>a</think><answer>85</answer>", 0.0),  # text before <think>
    ("q", "<think>a</think><answer>85</answer> ok", 0.0),  # text after </answer>
    ("q", "<think>a</think> so <answer>85</answer>", 0.0),  # text between the blocks
    ("q", "<answer>85</answer><think>a</think>", 0.0),  # wrong order
    ("q", "<think>a</think><answer>85</answer><answer>86</answer>", 0.0),  # a tag twice
    ("q", "<think><think>a</think></think><answer>85</answer>", 0.0),
    ("q", "<think>a<answer>85</answer></think>", 0.0),  # nested
    ("q", "<think>a</think><answer>85", 0.0),  # unclosed
    ("q", "<THINK>a</THINK><ANSWER>85</ANSWER>", 0.0),  # case-sensitive
    # A prompt ending with <think> (trailing whitespace ignored) opened the block: the completion continues it.
    (R1_PROMPT, " 7+8=15 </think> <answer>85</answer>", 1.0),
    (R1_PROMPT + " \n", "a</think><answer>85</answer>", 1.0),
    (R1_PROMPT, "<think>a</think><answer>85</answer>", 0.0),  # <think> twice (the prompt's and its own)
    (R1_PROMPT, "<answer>85</answer>", 0.0),  # the think block never closed
    ("<think> is a tag. Q:", "<think>a</think><answer>85</answer>", 1.0),  # only a prompt *ending* in <think>
])
def test_format(prompt, completion, expected):
  assert _value("format", completion, prompt=prompt) == expected


@pytest.mark.parametrize("completion, expected", [
    ("85", 1.0), (" 85 because", 1.0), ("-25", 1.0), ("0", 1.0), ("1000", 1.0),
    ("085", 0.0), ("-025", 0.0), ("00", 0.0), ("-0", 0.0),  # leading zeros, negative zero
    ("85.0", 0.0), ("no number", 0.0), ("", 0.0),
    ("<think>012</think> <answer>12</answer>", 1.0),  # the answer block is what counts
])
def test_canonical_number_ignores_the_value(completion, expected):
  assert _value("canonical_number", completion, example={"prompt": "37+48=", "answer": "999"}) == expected


def test_builtins_and_their_flags():
  assert {"arithmetic_exact", "exact_match", "format", "canonical_number"} <= set(rewards.registered())
  flags = {r.name: r.correctness for r in rewards.parse("arithmetic_exact,exact_match,format,canonical_number")}
  assert flags == {"arithmetic_exact": True, "exact_match": True, "format": False, "canonical_number": False}


def test_missing_answer_is_an_error_not_a_zero():
  for name in ("arithmetic_exact", "exact_match"):
    with pytest.raises(ValueError, match=f"reward '{name}' failed on row 0 \\(KeyError"):
      rewards.score(rewards.parse(name), ["p"], ["85"], [{"prompt": "p"}])


# ---- registry ----

def test_register_function_and_decorator():
  def f(prompt, completion, example):
    return 0.5
  assert rewards.register("half", f) is f

  @rewards.register("is_long", correctness=True)
  def is_long(prompt, completion, example):
    return float(len(completion) > 3)

  assert is_long("p", "abcd", {}) == 1.0  # the decorator returns the function itself
  assert {"half", "is_long"} <= set(rewards.registered())
  half, long_ = rewards.parse("half, is_long:2")
  assert (half.fn, half.correctness, long_.fn, long_.correctness) == (f, False, is_long, True)


def test_register_errors():
  fn = lambda p, c, e: 1.0
  rewards.register("twice", fn)
  with pytest.raises(ValueError, match="'twice' is already registered"):
    rewards.register("twice", fn)
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("format", fn)  # a built-in name too
  for bad in ("", "a.b", "a:b", "a,b", "a b", "1st", None):
    with pytest.raises(ValueError, match="must match"):
      rewards.register(bad, fn)
  with pytest.raises(ValueError, match="not callable"):
    rewards.register("value", 3)
  assert "value" not in rewards.registered()


def test_registrations_stay_in_the_test_that_made_them():
  assert "twice" not in rewards.registered() and "half" not in rewards.registered()


# ---- dotted paths ----

def test_dotted_path(user_module):
  length, right = rewards.parse("rewards_user_mod.length:0.5, rewards_user_mod.right")
  assert (length.name, length.weight, length.fn, length.correctness) == ("rewards_user_mod.length", 0.5,
                                                                        user_module.length, False)
  assert right.fn is user_module.right and right.correctness  # registered by its module with correctness
  real = rewards.parse("data.arithmetic.score")[0]  # a real package.module.function
  from data import arithmetic  # pylint: disable=g-import-not-at-top
  assert real.fn is arithmetic.score and real.weight == 1.0


@pytest.mark.parametrize("spec, message", [
    ("no_such_pkg_xyz.module.fn", r"reward 'no_such_pkg_xyz.module.fn': cannot import module "
                                  r"'no_such_pkg_xyz.module'"),
    ("rewards_user_mod.missing", r"module 'rewards_user_mod' has no attribute 'missing'"),
    ("rewards_user_mod.CONSTANT:2", r"'rewards_user_mod.CONSTANT': rewards_user_mod.CONSTANT is a int, not a "
                                    r"function"),
    (".fn", r"not a dotted path"),
    ("rewards_user_mod.", r"not a dotted path"),
])
def test_dotted_path_errors(user_module, spec, message):
  del user_module
  with pytest.raises(ValueError, match=message):
    rewards.parse(spec)


# ---- spec ----

def test_parse():
  parsed = rewards.parse("arithmetic_exact:1.0,format:0.2")
  assert [(r.name, r.weight, r.correctness) for r in parsed] == [("arithmetic_exact", 1.0, True),
                                                                 ("format", 0.2, False)]
  assert parsed[0].fn is rewards.arithmetic_exact and parsed[1].fn is rewards.format_reward
  loose = rewards.parse("  format ,\texact_match : -0.5 , arithmetic_exact:0 ")  # whitespace, penalty, 0
  assert [(r.name, r.weight) for r in loose] == [("format", 1.0), ("exact_match", -0.5), ("arithmetic_exact", 0.0)]
  assert rewards.parse("format:1e-1")[0].weight == 0.1
  with pytest.raises(dataclasses.FrozenInstanceError):
    parsed[0].weight = 2.0


@pytest.mark.parametrize("spec, message", [
    ("", "empty reward spec"),
    ("  ", "empty reward spec"),
    ("format,,exact_match", "empty item"),
    ("format,", "empty item"),
    ("nope", "unknown reward 'nope'"),
    ("format:0.2,nope:1", "unknown reward 'nope'"),
    ("format:1:2", "unknown reward 'format:1'"),  # the last ':' separates the weight
    (":1", "has no name"),
    ("format:", "weight '' is not a number"),
    ("format:abc", "weight 'abc' is not a number"),
    ("format:nan", "weight 'nan' is not finite"),
    ("format:inf", "weight 'inf' is not finite"),
    ("format:-inf", "weight '-inf' is not finite"),
    ("format:1,format:2", "'format' appears twice"),
    ("format, format", "'format' appears twice"),
])
def test_parse_errors_list_the_known_names(spec, message):
  with pytest.raises(ValueError) as e:
    rewards.parse(spec)
  assert message in str(e.value)
  assert "arithmetic_exact, canonical_number, exact_match, format" in str(e.value)  # the known names
  assert "package.module.function" in str(e.value)


def test_parse_rejects_a_non_string():
  with pytest.raises(ValueError, match="empty reward spec"):
    rewards.parse(None)


# ---- scoring ----

def test_score_total_per_name_and_correct():
  completions = ["<think>a</think> <answer>85</answer>", "85", "<think>a</think><answer>84</answer>", "x"]
  examples = [EX] * 4
  total, per_name, correct = rewards.score(rewards.parse("arithmetic_exact:1.0,format:0.2"), ["q"] * 4,
                                           completions, examples)
  np.testing.assert_allclose(total, [1.2, 1.0, 0.2, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(per_name["arithmetic_exact"], [1, 1, 0, 0])
  np.testing.assert_array_equal(per_name["format"], [1, 0, 1, 0])  # unweighted
  np.testing.assert_array_equal(correct, [1, 1, 0, 0])
  assert total.dtype == correct.dtype == per_name["format"].dtype == np.float32
  assert total.shape == correct.shape == (4,) and list(per_name) == ["arithmetic_exact", "format"]


def test_correct_is_the_mean_of_the_correctness_rewards():
  # "85!" passes arithmetic_exact (its first number is 85) but not exact_match (the text is not "85").
  completions = ["85", "85!", "84"]
  total, per_name, correct = rewards.score(rewards.parse("arithmetic_exact:2,exact_match:-1,format:5"),
                                           ["q"] * 3, completions, [EX] * 3)
  np.testing.assert_array_equal(per_name["exact_match"], [1, 0, 0])
  np.testing.assert_array_equal(correct, [1.0, 0.5, 0.0])  # unweighted mean of arithmetic_exact, exact_match
  np.testing.assert_array_equal(total, [1.0, 2.0, 0.0])


def test_no_correctness_reward_gives_no_correct():
  total, per_name, correct = rewards.score(rewards.parse("format"), ["q"], ["x"], [EX])
  assert correct is None and total.tolist() == [0.0] and set(per_name) == {"format"}


def test_score_passes_prompt_completion_and_example():
  seen = []
  rewards.register("spy", lambda p, c, e: seen.append((p, c, e)) or 1)  # an int is fine: float() takes it
  examples = [{"prompt": "a", "answer": "1", "extra": 7}, {"prompt": "b", "answer": "2"}]
  total, _, _ = rewards.score(rewards.parse("spy:3"), ["P(a)", "P(b)"], ["ca", "cb"], examples)
  assert seen == [("P(a)", "ca", examples[0]), ("P(b)", "cb", examples[1])]
  assert total.tolist() == [3.0, 3.0]


def test_score_of_no_rows():
  total, per_name, correct = rewards.score(rewards.parse("arithmetic_exact,format"), [], [], [])
  assert total.shape == per_name["format"].shape == correct.shape == (0,)


def _boom(prompt, completion, example):
  raise RuntimeError("boom")


@pytest.mark.parametrize("fn, message", [
    (_boom, r"reward 'bad' failed on row 1 \(RuntimeError: boom\); completion 'second'"),
    (lambda p, c, e: math.nan, r"reward 'bad' returned nan on row 0; completion 'first'"),
    (lambda p, c, e: -math.inf, r"reward 'bad' returned -inf on row 0; completion 'first'"),
    (lambda p, c, e: None, r"reward 'bad' failed on row 0 \(TypeError: .*\); completion 'first'"),
    (lambda p, c, e: "high", r"reward 'bad' failed on row 0 \(ValueError: .*\); completion 'first'"),
])
def test_a_broken_reward_is_an_error_naming_it(fn, message):
  wrapped = fn
  if fn is _boom:
    wrapped = lambda p, c, e: 0.0 if c == "first" else _boom(p, c, e)
  rewards.register("bad", wrapped)
  with pytest.raises(ValueError, match=message):
    rewards.score(rewards.parse("format,bad"), ["q", "q"], ["first", "second"], [EX, EX])


def test_long_completions_are_shortened_in_errors():
  rewards.register("bad", lambda p, c, e: math.nan)
  with pytest.raises(ValueError, match=r"completion 'xxx+'… \(5000 characters\)$") as e:
    rewards.score(rewards.parse("bad"), ["q"], ["x" * 5000], [EX])
  assert len(str(e.value)) < 500


def test_score_argument_errors():
  with pytest.raises(ValueError, match="no rewards"):
    rewards.score([], ["q"], ["c"], [EX])
  with pytest.raises(ValueError, match="1 prompts, 2 completions, 2 examples"):
    rewards.score(rewards.parse("format"), ["q"], ["c", "d"], [EX, EX])
  fmt = rewards.parse("format")[0]
  with pytest.raises(ValueError, match="repeat a name"):
    rewards.score([fmt, rewards.Reward("format", 2.0, fmt.fn)], ["q"], ["c"], [EX])
