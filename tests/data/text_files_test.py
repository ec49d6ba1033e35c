"""The bring-your-own-data builder over generated text and JSONL files."""

import json
import os
import tempfile

from absl.testing import absltest

import datatest_util
from data import text_files


def _build(pattern, data_dir, **kwargs):
  builder = text_files.TextFiles(pattern=pattern, data_dir=data_dir, **kwargs)
  builder.download_and_prepare(file_format="array_record")
  return builder


def _examples(builder, split):
  if split not in builder.info.splits:  # a split no document hashed into is left out
    return []
  ds = builder.as_data_source(split=split)
  return [(ds[i]["path"].decode(), ds[i]["text"].decode()) for i in range(len(ds))]


class TextFilesTest(absltest.TestCase):

  def _tmp(self) -> str:
    return self.enter_context(tempfile.TemporaryDirectory())

  def setUp(self):
    super().setUp()
    self.corpus = datatest_util.write_corpus(self._tmp())

  def test_deterministic_disjoint_splits(self):
    a = _build(self.corpus, self._tmp())
    b = _build(self.corpus, self._tmp())
    keys = {}
    for split in ("train", "validation"):
      ex_a, ex_b = _examples(a, split), _examples(b, split)
      self.assertEqual(ex_a, ex_b)  # same documents in the same order from two independent builds
      self.assertNotEmpty(ex_a)
      keys[split] = {k for k, _ in ex_a}
      for k, _ in ex_a:
        self.assertEqual(datatest_util.expected_split(k), split)
    self.assertEmpty(keys["train"] & keys["validation"])
    self.assertLen(keys["train"] | keys["validation"], 40 + 160)

  def test_jsonl_records_and_text_files(self):
    builder = _build(self.corpus, self._tmp())
    examples = dict(_examples(builder, "train") + _examples(builder, "validation"))
    with open(os.path.join(self.corpus, "records.jsonl"), encoding="utf-8") as f:
      first = json.loads(f.readline())["text"]
    self.assertEqual(examples["records.jsonl:1"], first)
    with open(os.path.join(self.corpus, "sub", "file001.txt"), encoding="utf-8") as f:
      self.assertEqual(examples["sub/file001.txt"], f.read())

  def test_glob_pattern_and_skipped_files(self):
    with open(os.path.join(self.corpus, "latin1.txt"), "wb") as f:
      f.write("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    with open(os.path.join(self.corpus, "empty.txt"), "w") as f:
      f.write("  \n")  # whitespace only: skipped
    builder = _build(os.path.join(self.corpus, "*.txt"), self._tmp())
    keys = {k for k, _ in _examples(builder, "train") + _examples(builder, "validation")}
    self.assertEqual(keys, {f"file{i:03d}.txt" for i in range(0, 40, 2)})

  def test_config_fingerprint_follows_the_files(self):
    before = text_files.make_config(self.corpus).name
    self.assertEqual(text_files.make_config(self.corpus).name, before)
    with open(os.path.join(self.corpus, "new.txt"), "w") as f:
      f.write("a new document")
    self.assertNotEqual(text_files.make_config(self.corpus).name, before)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "matches no files"):
      text_files.make_config(os.path.join(self.corpus, "*.nothing"))
    with self.assertRaisesRegex(ValueError, "needs a glob"):
      text_files.make_config("")
    bad = self._tmp()
    with open(os.path.join(bad, "bad.jsonl"), "w") as f:
      f.write('{"text": "ok"}\n{"title": "no text"}\n')
    with self.assertRaisesRegex(ValueError, r"bad.jsonl:2"):
      _build(bad, self._tmp())


if __name__ == "__main__":
  absltest.main()
