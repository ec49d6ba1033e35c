"""data/prompts.py: templates, prompt JSONL files (line errors, globs, the held-out split), the arithmetic
dataset as prompts, and the config errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_collections
import pytest

from data import arithmetic
from data import config as config_lib
from data import prompts
from data import split as split_lib
from training import rewards


@pytest.fixture(scope="module")
def arithmetic_dir():
  """One data dir for the module: the arithmetic TFDS build takes seconds, so it is built once."""
  path = tempfile.mkdtemp(prefix="deepseek_jax_prompts_")
  yield path
  shutil.rmtree(path, ignore_errors=True)


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def _config(**overrides):
  c = config_lib.default_data_config()
  c.prompt_files = ""
  c.prompt_eval_files = ""
  c.update(overrides)
  return c


def _records(n, prefix="q"):
  return [{"prompt": f"{prefix}{i}", "answer": str(i)} for i in range(n)]


# ---- templates ----

def test_render():
  assert prompts.render(prompts.DEFAULT_TEMPLATE, "37+48=") == "37+48="
  assert prompts.render("Q: {prompt}\nA:", "2+2=") == "Q: 2+2=\nA:"
  # Other braces are literal (no str.format): JSON, LaTeX and {other} names survive.
  assert prompts.render('{"q": "{prompt}", "x": {y}} \\frac{1}{2}', "hi") == '{"q": "hi", "x": {y}} \\frac{1}{2}'
  assert prompts.render("{prompt}!", "{prompt}") == "{prompt}!"  # the prompt itself is not re-scanned
  for bad in ("no placeholder", "{prompt} and {prompt}", "{ prompt }", "{Prompt}"):
    with pytest.raises(ValueError, match="exactly once"):
      prompts.render(bad, "x")


def test_r1_zero_template():
  text = prompts.render(prompts.R1_ZERO_TEMPLATE, "37+48=")
  assert text.endswith("User: 37+48=\nAssistant: <think>")
  assert "<answer>" in text and "</think>" in text  # the instruction names the tags
  # The template opens the think block, so a completion that closes it and answers is well formatted.
  fmt = rewards.parse("format,arithmetic_exact")
  _, per_name, correct = rewards.score(fmt, [text] * 2, [" 7+8=15, so 85 </think> <answer>85</answer>", "85"],
                                       [{"prompt": "37+48=", "answer": "85"}] * 2)
  assert per_name["format"].tolist() == [1.0, 0.0] and correct.tolist() == [1.0, 1.0]


# ---- prompt files: lines and globs ----

@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('"just a string"', "must be a JSON object, got str"),
    ({"answer": "1"}, '"prompt" is missing'),
    ({"prompt": "a"}, '"answer" is missing'),
    ({"prompt": 3, "answer": "1"}, '"prompt" must be a string, got int'),
    ({"prompt": "a", "answer": 1}, '"answer" must be a string, got int'),
    ({"prompt": None, "answer": "1"}, '"prompt" must be a string, got NoneType'),
    ({"prompt": "", "answer": "1"}, '"prompt" is empty'),
    ({"prompt": " \n", "answer": "1"}, '"prompt" is empty'),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "b"}, "", line])
  with pytest.raises(ValueError, match=r"p\.jsonl:3: ") as e:
    prompts.read_prompts(path)
  assert message in str(e.value)
  with pytest.raises(ValueError, match=r"p\.jsonl:3: "):  # the same through load_prompts, any split
    prompts.load_prompts(_config(prompt_files=path), "validation")


def test_non_utf8_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff", "answer": "b"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: "):
    prompts.read_prompts(str(path))


def test_records_keep_extra_keys_and_skip_blank_lines(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "", "id": 7, "meta": {"k": [1]}}, "  ",
                                       {"prompt": "b", "answer": "2"}])
  assert prompts.read_prompts(path) == [(path, 1, {"prompt": "a", "answer": "", "id": 7, "meta": {"k": [1]}}),
                                        (path, 3, {"prompt": "b", "answer": "2"})]
  assert prompts.load_prompts(_config(prompt_files=path, prompt_eval_files=path), "train")[0]["id"] == 7


def test_globs(tmp_path):
  a = _write(tmp_path / "a.jsonl", _records(2, "a"))
  os.makedirs(tmp_path / "sub")
  b = _write(tmp_path / "sub" / "b.jsonl", _records(2, "b"))
  assert prompts.resolve_files(f" {tmp_path}/**/*.jsonl , {a}") == sorted([a, b])  # recursive, distinct
  both = _config(prompt_files=f"{b},{a}", prompt_eval_files=a)
  assert [r["prompt"] for r in prompts.load_prompts(both, "train")] == ["a0", "a1", "b0", "b1"]  # sorted paths
  with pytest.raises(ValueError, match=r"prompt_files glob '.*nothing\*\.jsonl' matches no file"):
    prompts.load_prompts(_config(prompt_files=f"{a},{tmp_path}/nothing*.jsonl"), "train")
  with pytest.raises(ValueError, match=r"prompt_eval_files glob '.*none\.jsonl' matches no file"):
    prompts.load_prompts(_config(prompt_files=a, prompt_eval_files=f"{tmp_path}/none.jsonl"), "validation")
  with pytest.raises(ValueError, match="names no file"):
    prompts.load_prompts(_config(prompt_files=" , "), "train")


# ---- prompt files: splits ----

def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
  _write(tmp_path / "a.jsonl", _records(300, "a"))
  _write(tmp_path / "b.jsonl", _records(100, "b"))
  cfg = _config(prompt_files=f"{tmp_path}/*.jsonl")
  train, val = prompts.load_prompts(cfg, "train"), prompts.load_prompts(cfg, "validation")
  assert prompts.load_prompts(cfg, "train") == train and prompts.load_prompts(cfg, "validation") == val
  names = lambda rs: [r["prompt"] for r in rs]
  assert not set(names(train)) & set(names(val)) and len(train) + len(val) == 400
  assert 5 <= len(val) <= 45  # ~5 %
  # Exactly the records whose `basename:line` key the hash holds out (line n holds record n - 1).
  expected = [f"{f[0]}{n - 1}" for f, count in (("a.jsonl", 300), ("b.jsonl", 100)) for n in range(1, count + 1)
              if split_lib.is_validation(f"{f}:{n}", 5.0)]
  assert names(val) == expected and prompts.VALIDATION_PERCENT == 5.0
  # The key is the basename and line only: the same file elsewhere splits the same way.
  os.makedirs(tmp_path / "elsewhere")
  shutil.copy(tmp_path / "a.jsonl", tmp_path / "elsewhere" / "a.jsonl")
  moved = _config(prompt_files=f"{tmp_path}/elsewhere/a.jsonl")
  assert names(prompts.load_prompts(moved, "validation")) == [p for p in expected if p.startswith("a")]


def test_small_files_still_have_both_splits(tmp_path):
  two = _config(prompt_files=_write(tmp_path / "two.jsonl", _records(2)))
  assert len(prompts.load_prompts(two, "train")) == 1 and len(prompts.load_prompts(two, "validation")) == 1
  one = _config(prompt_files=_write(tmp_path / "one.jsonl", _records(1)))
  assert split_lib.is_validation("one.jsonl:1", 5.0)  # the hash holds out the only record...
  assert len(prompts.load_prompts(one, "train")) == 1  # ...but training gets it back
  with pytest.raises(ValueError, match="no prompt records in split 'validation' of prompt_files"):
    prompts.load_prompts(one, "validation")
  # All held out by the hash: the first record goes back to train.
  records = [("h.jsonl", n, {}) for n in range(1, 2000) if split_lib.is_validation(f"h.jsonl:{n}", 5.0)][:3]
  assert [n for _, n, _ in prompts.split_records(records, "train")] == [records[0][1]]


def test_eval_files(tmp_path):
  train = _write(tmp_path / "train.jsonl", _records(30, "t"))
  ev = _write(tmp_path / "ev.jsonl", _records(4, "e"))
  cfg = _config(prompt_files=train, prompt_eval_files=ev)
  assert [r["prompt"] for r in prompts.load_prompts(cfg, "train")] == [f"t{i}" for i in range(30)]  # all
  assert [r["prompt"] for r in prompts.load_prompts(cfg, "validation")] == ["e0", "e1", "e2", "e3"]
  empty = _config(prompt_files=train, prompt_eval_files=_write(tmp_path / "empty.jsonl", [""]))
  with pytest.raises(ValueError, match="no prompt records in split 'validation' of prompt_eval_files"):
    prompts.load_prompts(empty, "validation")
  with pytest.raises(ValueError, match="prompt_eval_files is set but prompt_files is not"):
    prompts.load_prompts(_config(prompt_eval_files=ev, dataset="arithmetic"), "validation")


def test_count_and_split_names(tmp_path):
  path = _write(tmp_path / "p.jsonl", _records(10))
  cfg = _config(prompt_files=path, prompt_eval_files=path)
  assert prompts.load_prompts(cfg, "train", 3) == _records(3)
  assert prompts.load_prompts(cfg, "train", 100) == _records(10)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="count must be a positive int"):
      prompts.load_prompts(cfg, "train", bad)
  for split in ("test", "train[:50%]", ""):
    with pytest.raises(ValueError, match="splits 'train' and 'validation'"):
      prompts.load_prompts(cfg, split)


def test_prompt_files_win_over_the_dataset_and_plain_dicts_work(tmp_path):
  path = _write(tmp_path / "p.jsonl", _records(3))
  cfg = {"dataset": "python_stdlib", "prompt_files": path, "prompt_eval_files": path}
  assert prompts.load_prompts(cfg, "validation") == _records(3)
  assert prompts.load_prompts(ml_collections.ConfigDict(cfg), "train", 1) == _records(1)


# ---- the arithmetic dataset ----

def test_arithmetic(arithmetic_dir):
  cfg = _config(dataset="arithmetic", data_dir=arithmetic_dir)
  val = prompts.load_prompts(cfg, "validation", 5)
  problems = arithmetic.load_problems("validation", 5, arithmetic_dir, "d2")
  assert val == [{"prompt": p["problem"], "answer": p["answer"]} for p in problems]
  assert all(arithmetic.score(r["prompt"], r["answer"]) == 1.0 for r in val)
  assert prompts.load_prompts(_config(dataset="arithmetic/d2", data_dir=arithmetic_dir), "validation", 5) == val
  assert len(prompts.load_prompts(cfg, "test")) == 1000  # count None: the whole split
  train = prompts.load_prompts(cfg, "train", 50)
  assert len(train) == 50 and not {r["prompt"] for r in train} & {r["prompt"] for r in val}
  # Rewards score the records' answers as correct.
  _, _, correct = rewards.score(rewards.parse("arithmetic_exact"), [r["prompt"] for r in val],
                                [r["answer"] for r in val], val)
  assert correct.tolist() == [1.0] * 5


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="python_stdlib"), "GRPO prompts come from data_config.prompt_files .* or the arithmetic dataset"),
    (dict(dataset="sft_jsonl"), "got dataset 'sft_jsonl' and no prompt_files"),
    (dict(dataset=""), "GRPO prompts come from"),
    (dict(dataset="arithmetics"), "GRPO prompts come from"),
    (dict(dataset="arithmetic/d4"), r"unknown arithmetic config 'd4'; expected one of \('d2', 'd3', 'decimal'\)"),
])
def test_dataset_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    prompts.load_prompts(_config(**overrides), "train")


def test_arithmetic_split_names(arithmetic_dir):
  for split in ("validation[:10]", "eval", ""):
    with pytest.raises(ValueError, match="splits train, validation and test"):
      prompts.load_prompts(_config(dataset="arithmetic", data_dir=arithmetic_dir), split)
