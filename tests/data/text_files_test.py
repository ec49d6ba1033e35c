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

  def test_skip_reason(self):
    self.assertIsNone(text_files.skip_reason("def f():\n\tpass\r\n\f\n"))  # tab, CR, LF, FF are text
    self.assertIsNone(text_files.skip_reason("a" * 90 + "\x1b" * 10))  # 10 % controls: still text
    self.assertEqual(text_files.skip_reason("a" * 89 + "\x1b" * 11), "control characters")
    self.assertEqual(text_files.skip_reason("a\0" + "a" * 1000), "NUL")  # one NUL is enough
    self.assertEqual(text_files.skip_reason(" \n\t"), "empty")

  def test_skips_empty_and_binary_documents_with_a_logged_count(self):
    corpus = self._tmp()
    files = {"good.txt": b"plain text\n", "nul.txt": b"\0" * 64, "controls.txt": b"ab\x01\x02" * 16,
             "escapes.txt": b"\x1b[1mbold\x1b[0m and a long enough run of plain text to stay below 10 %",
             "records.jsonl": b"\n".join([b'{"text": "fine"}', b'{"text": ""}', b'{"text": "  \\n "}',
                                          b'{"text": "x\\u0000y"}', b'{"text": "\\u0007\\u0007\\u0007ab"}'])}
    for name, data in files.items():
      with open(os.path.join(corpus, name), "wb") as f:
        f.write(data)
    with self.assertLogs(level="WARNING") as logs:
      builder = _build(corpus, self._tmp())
    keys = {k for k, _ in _examples(builder, "train") + _examples(builder, "validation")}
    self.assertEqual(keys, {"good.txt", "escapes.txt", "records.jsonl:1"})
    self.assertIn("skipped 6 documents (2 NUL, 2 control characters, 2 empty)", "\n".join(logs.output))

  def test_not_utf8_jsonl_names_file_and_line(self):
    bad = self._tmp()
    with open(os.path.join(bad, "bad.jsonl"), "wb") as f:
      f.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    with self.assertRaisesRegex(ValueError, r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 14 of the line\)"):
      _build(bad, self._tmp())

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
