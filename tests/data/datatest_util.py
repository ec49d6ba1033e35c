"""Shared helpers for the data tests: a small generated corpus, built once per test process."""

import functools
import json
import os
import random
import tempfile

from data import config as config_lib
from data import split as split_lib
from tools import train_tokenizer

_WORDS = ("alpha", "beta", "gamma", "delta", "λ", "naïve", "日本", "🙂", "def", "return", "\t", "    ")


def write_corpus(root: str, num_text_files: int = 40, num_jsonl_records: int = 160, seed: int = 0) -> str:
  """Writes text files (lengths 1..~3000 bytes) and one JSONL file under `root`; returns `root`."""
  rng = random.Random(seed)
  def doc(i):
    n = rng.choice([1, 5, 20, 80, 300, 600])
    return f"doc {i}: " + " ".join(rng.choice(_WORDS) for _ in range(n)) + "\n"
  os.makedirs(os.path.join(root, "sub"), exist_ok=True)
  for i in range(num_text_files):
    with open(os.path.join(root, "sub" if i % 2 else "", f"file{i:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(doc(i))
  with open(os.path.join(root, "records.jsonl"), "w", encoding="utf-8") as f:
    for i in range(num_jsonl_records):
      f.write(json.dumps({"text": doc(1000 + i), "id": i}) + "\n")
  return root


@functools.cache
def corpus_dir() -> str:
  return write_corpus(tempfile.mkdtemp(prefix="deepseek_jax_corpus_"))


@functools.cache
def shared_data_dir() -> str:
  return tempfile.mkdtemp(prefix="deepseek_jax_tfds_")


def text_files_config(**overrides):
  """A data config over the generated corpus, built into a per-process temporary data dir."""
  c = config_lib.default_data_config()
  c.dataset = "text_files"
  c.text_files = corpus_dir()
  c.data_dir = shared_data_dir()
  c.update(overrides)
  return c


def expected_split(key: str) -> str:
  return split_lib.split_of(key)


TEXTS = (
    "hello world",
    "def f(x):\n    return x + 1\n\n\tif x:  pass  # two spaces\n",
    "naïve café — λ → 日本語 🙂 mixed",
    "  leading and trailing spaces  ",
    "numbers 1234567 and symbols {}[]()<>!?",
    "",
)
_TOKENIZER_CORPUS = ["import os\n\ndef main():\n    print('hello world')\n", "class A:\n    x = 1\n",
                     *TEXTS[:5]] * 4


def sentencepiece_model(tmp: str) -> str:
  """A small SentencePiece model trained (offline, in ~0.1 s) by tools/train_tokenizer.py."""
  return train_tokenizer.train(_TOKENIZER_CORPUS, vocab_size=320, out=os.path.join(tmp, "spm.model"))


def hf_tokenizer_dir(tmp: str, with_config: bool) -> str:
  """A byte-level BPE tokenizer.json trained on a few strings (DeepSeek's tokenizer is this kind).

  Specials: <pad> 0, <eos> 1, <bos> 2. With `with_config`, a tokenizer_config.json names <eos>/<bos>
  and sets pad_token to null (so pad falls back to EOS).
  """
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
  out = os.path.join(tmp, "hf_config" if with_config else "hf")
  os.makedirs(out)
  tok.save(os.path.join(out, "tokenizer.json"))
  if with_config:
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"eos_token": {"content": "<eos>"}, "bos_token": "<bos>", "pad_token": None}, f)
  return out
