"""evaluation.tasks and evaluation.sample on an untrained tiny model (in process), and --hf_dir loading."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

import models
from configs import tiny
from data import tokenizers
from evaluation import restore, runner, sample, tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
  return models.Transformer(models.from_dict(tiny.get_config("test").model.to_dict()), rngs=nnx.Rngs(0))


PROBLEMS = [{"problem": p, "answer": a} for p, a in (("1+1=", "2"), ("12*34=", "408"), ("99-100=", "-1"),
                                                       ("5+5=", "10"), ("7*7=", "49"))]


def test_batched_prompts_of_different_lengths_complete_as_alone(model):
  tok = tokenizers.ByteTokenizer()
  prompts = ["1+1=", "99-100="]
  together = sample.complete(model, tok, prompts, max_new_tokens=6)
  alone = [sample.complete(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
  assert together == alone


def test_arithmetic_task_scores_greedy_completions(model):
  tok = tokenizers.ByteTokenizer()
  result = tasks.arithmetic(model, tok, problems=PROBLEMS, batch_size=2, max_new_tokens=6)
  assert result["num_examples"] == 5
  completions = sample.complete(model, tok, [p["problem"] for p in PROBLEMS[:2]], max_new_tokens=6, pad_to=7)
  assert [e["completion"] for e in result["examples"][:2]] == completions
  assert result["accuracy"] == np.mean([e["score"] for e in result["examples"]])
  scored = tasks.score_completions(PROBLEMS, ["2", "408 yes", "1", "10", "no"])
  assert scored["accuracy"] == pytest.approx(0.6)
  assert [e["score"] for e in scored["examples"]] == [1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("oracle, accuracy", [
    (lambda p: p["answer"], 1.0),
    (lambda p: str(int(p["answer"]) + 1), 0.0),
    (lambda p: p["answer"] if "*" in p["problem"] else "no", 0.4),
])
def test_arithmetic_task_scores_each_problem_by_its_own_completion(monkeypatch, oracle, accuracy):
  # 5 problems in batches of 2: the last batch is padded, and a completion taken from the padding or
  # from another row would be scored against the wrong problem.
  answers = {p["problem"]: oracle(p) for p in PROBLEMS}
  calls = []

  def complete_ids(model, tokenizer, ids, lengths, **kwargs):
    prompts = [tokenizer.decode(row[:n]) for row, n in zip(ids, lengths)]
    calls.append(prompts)
    return [answers[p] for p in prompts]

  monkeypatch.setattr(sample, "complete_ids", complete_ids)
  result = tasks.arithmetic(None, tokenizers.ByteTokenizer(), problems=PROBLEMS, batch_size=2)
  assert [len(c) for c in calls] == [2, 2, 2]
  assert result["accuracy"] == pytest.approx(accuracy)
  assert [e["completion"] for e in result["examples"]] == [answers[p["problem"]] for p in PROBLEMS]


def test_sampling_is_seeded(model):
  tok = tokenizers.ByteTokenizer()
  kwargs = dict(num_samples=3, max_new_tokens=12, temperature=1.0, top_p=0.95)
  a = sample.sample(model, tok, "def fib(", seed=0, **kwargs)
  assert len(a) == 3 and len(set(a)) > 1  # rows draw independently
  assert sample.sample(model, tok, "def fib(", seed=0, **kwargs) == a
  assert sample.sample(model, tok, "def fib(", seed=1, **kwargs) != a


def _char_tokenizer(path):
  """A character-level tokenizer.json of 97 ids (the v3_tiny fixture's vocabulary size)."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  chars = ["\n", " "] + [chr(c) for c in range(0x21, 0x7F) if chr(c) != "`"]
  vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
  tok = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.add_special_tokens(["<eos>", "<unk>"])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>"}, f)


def test_hf_dir_evaluates(tmp_path):
  hf_dir = tmp_path / "v3_tiny"
  shutil.copytree(os.path.join(REPO, "tests", "fixtures", "hf", "v3_tiny"), hf_dir)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    restore.load_hf(str(hf_dir))
  _char_tokenizer(str(hf_dir))
  config, model, step = restore.load_hf(str(hf_dir), seq_len=32, batch_size=2, eval_batches=1,
                                        data_dir=str(tmp_path / "tfds"))
  tok = restore.tokenizer_for(config)
  assert step == 0 and tok.vocab_size == model.cfg.vocab_size == 97
  results = runner.evaluate(config, model, tok, step=step, output_dir=str(tmp_path / "eval"), source=str(hf_dir))
  assert results["eval"]["eval/tokens"] > 0 and np.isfinite(results["eval"]["eval/bits_per_byte"])
  assert len(results["expert_load"]["moe_layers"]) == model.cfg.num_moe_layers
  assert os.path.isfile(tmp_path / "eval" / "results_0.json")
