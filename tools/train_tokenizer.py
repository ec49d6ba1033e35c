r"""Trains a SentencePiece tokenizer on a dataset's train split, offline.

  python -m tools.train_tokenizer --vocab_size=8192 --out=/tmp/stdlib_spm.model
  python -m tools.train_tokenizer --dataset=text_files --text_files='~/corpus/*.jsonl' --out=spm.model

then use it with `--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=/tmp/stdlib_spm.model`
(and a model vocab_size >= the tokenizer's). The model is trained for source code and round-trips
exactly: no normalisation, whitespace and indentation kept, no dummy-prefix space, newline as its own
piece, unseen characters as UTF-8 byte pieces. Ids: 0 pad, 1 unk, 2 bos, 3 eos.
"""

import io
import os
import random

from absl import app
from absl import flags
from absl import logging



def define_flags() -> None:
  """The command line's flags, defined only when run as a program: importing `train` (tests do) must not
  add a required --out to the process's absl flags, which other libraries (tokamax) parse."""
  flags.DEFINE_integer("vocab_size", 8192, "Number of pieces (>= 256 bytes + specials + chars).")
  flags.DEFINE_string("out", None, "Where to write the .model file.", required=True)
  flags.DEFINE_string("dataset", "python_stdlib", "python_stdlib | text_files")
  flags.DEFINE_string("data_dir", "", "TFDS data dir; '' = ~/.cache/deepseek_jax/tfds")
  flags.DEFINE_string("text_files", "", "Glob or directory for --dataset=text_files.")
  flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece algorithm.")
  flags.DEFINE_integer("max_lines", 300_000, "Lines sampled for training (speed bound).")


def training_lines(texts, max_lines: int, seed: int = 0) -> list[str]:
  """Non-empty lines of the documents (SentencePiece trains on 'sentences'), sampled to max_lines."""
  lines = [line for text in texts for line in text.split("\n") if line.strip()]
  if len(lines) > max_lines:
    lines = random.Random(seed).sample(lines, max_lines)
  return lines


def train(texts, vocab_size: int, out: str, model_type: str = "bpe", max_lines: int = 300_000) -> str:
  """Trains on an iterable of document strings and writes the model to `out`; returns `out`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  lines = training_lines(texts, max_lines)
  if not lines:
    raise ValueError("No text to train a tokenizer on.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=0.9995,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      user_defined_symbols=["\n"],
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      hard_vocab_limit=False,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(model.getvalue())
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  from data import config as data_config_lib  # pylint: disable=g-import-not-at-top
  from data import sources  # pylint: disable=g-import-not-at-top
  cfg = data_config_lib.default_data_config()
  cfg.dataset, cfg.data_dir, cfg.text_files = f.dataset, f.data_dir, f.text_files
  source = sources.data_source(cfg, "train")
  texts = (source[i]["text"].decode("utf-8") for i in range(len(source)))
  train(texts, f.vocab_size, f.out, f.model_type, f.max_lines)
  from data import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = tokenizers.SentencePieceTokenizer(f.out).vocab_size  # < --vocab_size on tiny corpora
  logging.info("Wrote %s (vocab %d) trained on %d %s train documents.", f.out, vocab, len(source), cfg.dataset)


if __name__ == "__main__":
  define_flags()
  app.run(main)
