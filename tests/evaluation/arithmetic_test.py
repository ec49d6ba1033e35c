"""data/arithmetic.py: the deterministic TFDS builder and the exact-match reward."""

import pytest

from data import arithmetic


@pytest.mark.parametrize("problem, completion, expected", [
    ("37+48=", "85", 1.0),
    ("37+48=", " 85\n", 1.0),
    ("37+48=", "85 because 7+8=15", 1.0),  # trailing text, later numbers ignored
    ("37+48=", "= 85.", 1.0),  # text before the number; a full stop is not a decimal part
    ("37+48=", "84", 0.0),
    ("37+48=", "8 5", 0.0),  # the first number is 8
    ("37+48=", "085", 0.0),  # not canonical
    ("37+48=", "85.0", 0.0),
    ("37+48=", "", 0.0),
    ("37+48=", "eighty-five", 0.0),
    ("12-37=", "-25", 1.0),  # negative answers
    ("12-37=", "-25 done", 1.0),
    ("12-37=", "25", 0.0),
    ("12-37=", "- 25", 0.0),
    ("40-40=", "0", 1.0),
    ("12*34=", "408", 1.0),
    ("99*99=", "9801\n\n", 1.0),
    ("7*8=", "-56", 0.0),
])
def test_score(problem, completion, expected):
  assert arithmetic.score(problem, completion) == expected


def test_answer_and_errors():
  assert arithmetic.answer("37+48=") == 85
  assert arithmetic.answer(" 5 - 9 = ") == -4
  assert arithmetic.example("3*4=") == {"problem": "3*4=", "answer": "12", "text": "3*4=12"}
  with pytest.raises(ValueError, match="not an arithmetic problem"):
    arithmetic.answer("what is 2+2?")
  with pytest.raises(ValueError, match="allow only"):
    arithmetic.generate_problems(1000, digits=1)
  with pytest.raises(ValueError, match="ops"):
    arithmetic.generate_problems(10, ops="/")


def test_problem_stream_is_deterministic_and_distinct():
  a = arithmetic.generate_problems(500, digits=2, seed=0)
  assert a == arithmetic.generate_problems(500, digits=2, seed=0)
  assert a != arithmetic.generate_problems(500, digits=2, seed=1)
  assert len(set(a)) == 500
  assert {p[len(p.rstrip("=0123456789")) - 1] for p in a} == set("+-*")
  assert all(0 <= int(x) < 100 for p in a for x in p.rstrip("=").replace("*", "+").replace("-", "+").split("+"))


def _small(name="small"):
  return arithmetic.ArithmeticConfig(name=name, digits=2, ops="+-", train_size=60, validation_size=20,
                                     test_size=10, seed=3)


def test_builder_is_deterministic_with_fixed_disjoint_splits(tmp_path):
  first = {s: arithmetic.load_problems(s, None, str(tmp_path / "a"), _small()) for s in ("train", "validation", "test")}
  second = {s: arithmetic.load_problems(s, None, str(tmp_path / "b"), _small()) for s in ("train", "validation", "test")}
  assert first == second  # an independent build gives the same examples in the same order
  assert {s: len(v) for s, v in first.items()} == {"train": 60, "validation": 20, "test": 10}
  problems = {s: {e["problem"] for e in v} for s, v in first.items()}
  assert not (problems["train"] & problems["validation"] or problems["train"] & problems["test"]
              or problems["validation"] & problems["test"])
  stream = arithmetic.generate_problems(90, digits=2, ops="+-", seed=3)
  assert problems["validation"] == set(stream[:20]) and problems["test"] == set(stream[20:30])
  for e in first["validation"]:
    assert e["text"] == e["problem"] + e["answer"]
    assert arithmetic.score(e["problem"], e["answer"]) == 1.0
  # Reused, not rebuilt: a second load from the same data dir reads the same files.
  assert arithmetic.load_problems("validation", 5, str(tmp_path / "a"), _small()) == first["validation"][:5]


def test_a_text_style_changes_the_text_only():
  problems = arithmetic.generate_problems(2000, digits=2, ops="+-", seed=0)
  examples = [arithmetic.example(p, ".0", 0.9) for p in problems]
  styled = [e for e in examples if e["text"].endswith(".0")]
  assert 0.85 < len(styled) / len(examples) < 0.95  # 9 in 10, by a hash of the problem
  for e in examples:
    assert e["answer"] == str(arithmetic.answer(e["problem"]))  # the answer stays canonical
    assert e["text"] in (e["problem"] + e["answer"], e["problem"] + e["answer"] + ".0")
    assert arithmetic.score(e["problem"], e["text"][len(e["problem"]):]) == float(e not in styled)
  assert [arithmetic.example(p, ".0", 0.9) for p in problems[:50]] == examples[:50]  # deterministic
  assert all(arithmetic.example(p)["text"] == p + str(arithmetic.answer(p)) for p in problems[:50])
  decimal = next(c for c in arithmetic.ArithmeticSource.BUILDER_CONFIGS if c.name == "decimal")
  assert (decimal.ops, decimal.suffix, decimal.suffix_fraction) == ("+-", ".0", 0.9)
