"""SFT data (dataset=sft_jsonl): line errors, rendering and loss masks (project and HF templates),
truncation, packing, the held-out split, resume, the pipeline contract, and tools/make_sft_task."""

import json
import os

import chex
import numpy as np
import pytest

from data import chat
from data import config as config_lib
from data import pipeline
from data import sft
from data import sources
from data import split as split_lib
from data import tokenizers
from tools import make_sft_task

BYTE = tokenizers.ByteTokenizer()
EOS = BYTE.eos_id
# A DeepSeek-V3-like template (system prompt after BOS, <|User|>/<|Assistant|> markers, EOS per turn).
DEEPSEEK_LIKE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|Assistant|>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"}]


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def _config(**overrides):
  c = config_lib.default_data_config()
  c.dataset = "sft_jsonl"
  c.update(overrides)
  return c


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"prompt": f"q{i} " + "x" * int(rng.integers(0, 25)), "completion": "y" * int(rng.integers(1, 12)),
           "answer": "extra keys are ignored"} for i in range(n)]


def _segments(batch):
  """Checks the row invariants; returns every (tokens, loss_mask) segment as a tuple pair."""
  out = []
  for t, s, p, m in zip(batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"]):
    n = int((s > 0).sum())
    assert (s[:n] > 0).all() and (s[n:] == 0).all() and (t[n:] == BYTE.pad_id).all() and (m[n:] == 0).all()
    for k in range(1, int(s.max(initial=0)) + 1):
      idx = np.flatnonzero(s == k)
      assert len(idx) and (np.diff(idx) == 1).all(), "a segment is contiguous"
      np.testing.assert_array_equal(p[idx], np.arange(len(idx)))
      assert m[idx[0]] == 0, "the first token of an example is never a target"
      out.append((tuple(t[idx]), tuple(m[idx])))
  return out


# ---- lines and files ----

@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ({"prompt": "a"}, '"completion" is missing'),
    ({"prompt": "a", "completion": 3}, '"completion" must be a string'),
    ({"prompt": None, "completion": "b"}, '"prompt" must be a string'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": 1}]}, '"content" must be a string'),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}], "prompt": "a", "completion": "b"}, "both"),
    ({"text": "x"}, 'needs "prompt" and "completion", or "messages"'),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, "", line])
  with pytest.raises(ValueError, match=r"train\.jsonl:3: ") as e:
    sft.read_examples(path)
  assert message in str(e.value)


def test_non_utf8_line_and_globs(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: "):
    sft.read_examples(str(path))
  with pytest.raises(ValueError, match=r"sft glob '.*nothing\*\.jsonl' matches no file"):
    sft.resolve_files(f"{path},{tmp_path}/nothing*.jsonl")
  with pytest.raises(ValueError, match="sft_files"):
    sft.resolve_files("")
  _write(tmp_path / "b.jsonl", [])
  assert sft.resolve_files(f"{tmp_path}/*.jsonl, {path}") == [str(tmp_path / "b.jsonl"), str(path)]


# ---- rendering ----

def test_prompt_completion_mask():
  ex = {"prompt": "ab", "completion": "cd"}
  tokens, mask = sft.encode_example(ex, BYTE, None)
  np.testing.assert_array_equal(tokens, [97, 98, 99, 100, EOS])
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1])
  assert tokens.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(sft.prompt_tokens(ex, BYTE, None), [97, 98])


def test_project_template_mask():
  tokens, mask = chat.encode_example({"messages": CHAT}, BYTE, None)
  text = lambda ids: bytes(int(i) for i in ids).decode()
  expected = "system: Be brief.\nuser: 2+2?\nassistant: 4\0user: and 3+3?\nassistant: 6\0"
  assert text(tokens) == expected
  assert text(tokens[mask == 1]) == "4\0" + "6\0"  # assistant contents and their EOS only
  prompt = chat.prompt_tokens({"messages": CHAT}, BYTE, None)
  assert text(prompt) == expected[:-2] and text(prompt).endswith("assistant: ")
  np.testing.assert_array_equal(tokens[:len(prompt)], prompt)


def _hf_dir(tmp_path, template):
  """A byte-level BPE tokenizer.json (specials <pad> <eos> <bos> <|User|> <|Assistant|>) + config."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<|User|>",
                                                                   "<|Assistant|>"],
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["Be brief. 2+2? and 3+3? 4 6"] * 4, trainer)
  out = tmp_path / "hf"
  out.mkdir()
  tok.save(str(out / "tokenizer.json"))
  cfg = {"eos_token": "<eos>", "bos_token": "<bos>", "pad_token": "<pad>", "chat_template": template}
  (out / "tokenizer_config.json").write_text(json.dumps(cfg))
  return str(out)


@pytest.mark.parametrize("with_eos", [True, False])
def test_hf_template_mask(tmp_path, with_eos):
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  template = DEEPSEEK_LIKE if with_eos else DEEPSEEK_LIKE.replace(" + eos_token", "")
  path = _hf_dir(tmp_path, template)
  cfg = _config(tokenizer="hf", tokenizer_path=path)
  assert chat.resolve_template(cfg) == template
  assert chat.resolve_template(_config(tokenizer="hf", tokenizer_path=path, chat_template="project")) is None
  tok = pipeline.make_tokenizer(cfg)
  raw = hf.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  specials = {name: raw.token_to_id(name) for name in ("<eos>", "<bos>", "<|User|>", "<|Assistant|>")}
  assert specials["<eos>"] not in tok.encode("<eos>")  # `encode` still reads special text as text
  assert tok.encode_with_special_tokens("a<eos>") == tok.encode("a") + [specials["<eos>"]]

  tokens, mask = chat.encode_example({"messages": CHAT}, tok, template)
  text = lambda ids: raw.decode([int(i) for i in ids], skip_special_tokens=False)
  assert tokens[0] == specials["<bos>"]
  assert text(tokens) == "<bos>Be brief.<|User|>2+2?<|Assistant|>4<eos><|User|>and 3+3?<|Assistant|>6<eos>"
  trained = tokens[mask == 1]
  assert text(trained) == "4<eos>6<eos>"  # EOS appended when the template does not write it
  assert (trained == specials["<eos>"]).sum() == 2
  prompt = chat.prompt_tokens({"messages": CHAT}, tok, template)
  assert prompt[-1] == specials["<|Assistant|>"]
  np.testing.assert_array_equal(tokens[:len(prompt)], prompt)
  assert mask[len(prompt):].all() and not mask[len(prompt) - 3:len(prompt)].any()


def test_hf_template_errors_name_the_line(tmp_path):
  bad = "{{ raise_exception('no system messages') if messages[0]['role'] == 'system' else '' }}x"
  f = _write(tmp_path / "c.jsonl", [{"messages": CHAT}])
  with pytest.raises(ValueError, match=r"c\.jsonl:1: chat template error: no system messages"):
    sft.load(_config(sft_files=f, sft_eval_files=f, chat_template=bad), "train", 64, BYTE)
  with pytest.raises(ValueError, match="neither a jinja2 template nor a file"):
    chat.resolve_template(_config(chat_template="/no/such/template.jinja"))


# ---- length ----

def test_truncation_and_skip_counts(tmp_path):
  f = _write(tmp_path / "t.jsonl", [
      {"prompt": "abc", "completion": "de"},            # 6 tokens: fits
      {"prompt": "0123456789", "completion": "xy"},     # 13: prompt cut to its last 5
      {"prompt": "p", "completion": "0123456789"},      # completion + EOS = 11 > 8 - 1: too long
      {"prompt": "p", "completion": ""},                # empty
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},  # empty
  ])
  ex = sft.load(_config(sft_files=f, sft_eval_files=f), "train", 8, BYTE)
  assert ex.counts == {"examples": 2, "truncated_prompts": 1, "skipped_empty": 2, "skipped_too_long": 1}
  assert bytes(ex.tokens[1].tolist()) == b"56789xy\0"
  np.testing.assert_array_equal(ex.loss_masks[1], [0, 0, 0, 0, 0, 1, 1, 1])
  bos_tokens, bos_mask = np.array([7, 1, 2, 3, 4, 5, 9, 9]), np.array([0, 0, 0, 0, 0, 0, 1, 1])
  tokens, mask, status = sft.fit(bos_tokens, bos_mask, 5, bos_id=7)  # BOS kept, prompt cut after it
  assert status == "truncated" and tokens.tolist() == [7, 4, 5, 9, 9] and mask.tolist() == [0, 0, 0, 1, 1]
  assert sft.fit(bos_tokens, bos_mask, 3, bos_id=7)[2] == "too_long"


# ---- split ----

def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
  a = _write(tmp_path / "a.jsonl", _examples(300))
  _write(tmp_path / "b.jsonl", _examples(100, seed=1))
  cfg = _config(sft_files=f"{tmp_path}/*.jsonl")
  keys = lambda split: [(os.path.basename(p), n) for p, n, _ in sft.split_records(cfg, split)]
  train, val = keys("train"), keys("validation")
  assert keys("train") == train and keys("validation") == val
  assert not set(train) & set(val) and len(train) + len(val) == 400
  assert 5 <= len(val) <= 45  # ~5 %
  assert val == [k for k in val if split_lib.is_validation(f"{k[0]}:{k[1]}", sft.VALIDATION_PERCENT)]
  two = _write(tmp_path / "two.jsonl", _examples(2))  # at least one validation example from 2
  assert len(sft.split_records(_config(sft_files=two), "validation")) == 1
  assert len(sft.split_records(_config(sft_files=two), "train")) == 1
  ev = _write(tmp_path / "ev.jsonl", _examples(3))
  cfg = _config(sft_files=a, sft_eval_files=ev)
  assert len(sft.split_records(cfg, "train")) == 300 and len(sft.split_records(cfg, "validation")) == 3


# ---- batches ----

def _data(tmp_path, n=150):
  f = _write(tmp_path / "d.jsonl", _examples(n))
  return _config(sft_files=f, sft_eval_files=f)


def test_packing_keeps_examples_whole(tmp_path):
  cfg = _data(tmp_path)
  ex = sft.load(cfg, "train", 48, BYTE)
  whole = {(tuple(t), tuple(m)) for t, m in zip(ex.tokens, ex.loss_masks)}
  it = pipeline.make_iterator(cfg, "train", seq_len=48, global_batch_size=4, seed=3)
  for _ in range(30):
    batch = next(it)
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    for v in batch.values():
      chex.assert_shape(v, (4, 48))
      assert v.dtype == np.int32
    segs = _segments(batch)
    assert set(segs) <= whole


def test_resume_is_exact(tmp_path):
  cfg = _data(tmp_path, n=40)  # a few batches per epoch: the resume crosses epochs
  make = lambda: pipeline.make_iterator(cfg, "train", seq_len=32, global_batch_size=4, seed=7)
  it = make()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(25)]
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(25)]):
    chex.assert_trees_all_equal(a, b)
  again = make()
  for _ in range(5):
    next(again)
  chex.assert_trees_all_equal(next(again), expected[0])  # deterministic given the seed
  other = pipeline.make_iterator(cfg, "train", seq_len=32, global_batch_size=4, seed=8)
  assert any(not np.array_equal(next(other)["tokens"], b["tokens"]) for b in expected[:3])


def test_processes_split_the_global_batch(tmp_path):
  cfg = _data(tmp_path)
  args = dict(seq_len=40, global_batch_size=4, seed=1)
  full = pipeline.make_iterator(cfg, "train", **args)
  parts = [pipeline.make_iterator(cfg, "train", process_index=p, process_count=2, **args) for p in (0, 1)]
  for _ in range(5):
    g, p0, p1 = next(full), next(parts[0]), next(parts[1])
    for k in g:
      np.testing.assert_array_equal(g[k][0::2], p0[k])
      np.testing.assert_array_equal(g[k][1::2], p1[k])


@pytest.mark.parametrize("process_count", [1, 2])
def test_validation_sees_every_example_once(tmp_path, process_count):
  cfg = _data(tmp_path, n=37)
  ex = sft.load(cfg, "validation", 32, BYTE)
  seen, counts = [], []
  for p in range(process_count):
    batches = list(pipeline.make_iterator(cfg, "validation", seq_len=32, global_batch_size=4, process_index=p,
                                          process_count=process_count, num_epochs=1))
    counts.append(len(batches))
    assert all(b["tokens"].shape == (4 // process_count, 32) for b in batches)
    seen += [s for b in batches for s in _segments(b)]
  assert len(set(counts)) == 1
  assert sorted(seen) == sorted((tuple(t), tuple(m)) for t, m in zip(ex.tokens, ex.loss_masks))


def test_validation_pads_the_last_batch(tmp_path):
  f = _write(tmp_path / "v.jsonl", [{"prompt": f"{i:02d}" + "p" * 18, "completion": "c" * 5} for i in range(5)])
  batches = list(pipeline.make_iterator(_config(sft_files=f, sft_eval_files=f), "validation", seq_len=32,
                                        global_batch_size=4, num_epochs=1))
  assert len(batches) == 2  # 5 examples of 26 tokens: one per row
  used = [(b["segment_ids"] > 0).any(axis=1).tolist() for b in batches]
  assert used == [[True] * 4, [True, False, False, False]]
  assert (batches[1]["loss_mask"][1:] == 0).all() and (batches[1]["positions"][1:] == 0).all()


def test_config_and_sources(tmp_path):
  from configs import common  # pylint: disable=g-import-not-at-top  (pulls in models)
  for c in (config_lib.default_data_config(), common.data_defaults()):
    assert c.sft_files == "" and c.sft_eval_files == "" and c.chat_template == ""
  assert sources.parse_dataset("sft_jsonl") == ("sft_jsonl", None)
  with pytest.raises(ValueError):
    sources.parse_dataset("sft_jsonl/x")
  assert sources.prepare(_config(sft_files="x")) == ""
  with pytest.raises(ValueError, match="matches no file"):
    pipeline.make_iterator(_config(sft_files=f"{tmp_path}/*.jsonl"), "train", 32, 4)
  with pytest.raises(ValueError, match="no slicing"):
    pipeline.make_iterator(_data(tmp_path), "train[:50%]", 32, 4)


# ---- tools/make_sft_task ----

@pytest.mark.parametrize("task", make_sft_task.TASKS)
def test_make_sft_task(tmp_path, task):
  train_path, test_path = make_sft_task.write_task(task, str(tmp_path), train=300, test=20, seed=0)
  train, test = (sft.read_examples(p) for p in (train_path, test_path))
  assert len(train) == 300 and len(test) == 20
  assert make_sft_task.make_task(task, 300, 20, 0) == ([e for *_, e in train], [e for *_, e in test])
  for *_, ex in train + test:
    assert set(ex) == {"prompt", "completion"}
    assert len(ex["prompt"].encode()) + len(ex["completion"].encode()) + 1 <= 32
    noise, _, rest = ex["prompt"].partition(" ")
    assert 4 <= len(noise) <= 8 and set(noise) <= set(make_sft_task.NOISE)
    if task == "arithmetic":
      assert ex["completion"] == str(sft_arithmetic_answer(rest))
    else:
      name, word = rest.rstrip("=").split(" ")
      assert name == task and word.isalpha() and word.islower() and 3 <= len(word) <= 6
      assert ex["completion"] == (word[::-1] if task == "reverse" else word.upper())
  question = lambda ex: ex["prompt"].partition(" ")[2]
  assert not {question(e) for *_, e in train} & {question(e) for *_, e in test}  # held out
  assert len({question(e) for *_, e in test}) == 20


def sft_arithmetic_answer(problem):
  from data import arithmetic  # pylint: disable=g-import-not-at-top
  return arithmetic.answer(problem)
