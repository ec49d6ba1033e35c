"""The embedded corpus: built once from this Python's stdlib into a temporary data dir."""

import os
import tempfile
import time

from absl.testing import absltest

from data import split as split_lib
from data import stdlib_corpus


class StdlibCorpusTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp(prefix="stdlib_tfds_")
    cls.builder = stdlib_corpus.StdlibSource(data_dir=cls.data_dir)
    start = time.perf_counter()
    cls.builder.download_and_prepare(file_format="array_record")
    cls.build_seconds = time.perf_counter() - start
    cls.splits = {s: cls.builder.as_data_source(split=s) for s in ("train", "validation")}

  def test_builds_fast(self):
    self.assertLess(self.build_seconds, 30.0)  # ~1 s on a 2-core CPU; the brief's bound is a minute

  def test_splits_are_disjoint_by_file_and_follow_the_hash(self):
    paths = {s: [ds[i]["path"].decode() for i in range(len(ds))] for s, ds in self.splits.items()}
    self.assertGreater(len(paths["train"]), 300)
    self.assertNotEmpty(paths["validation"])
    self.assertEmpty(set(paths["train"]) & set(paths["validation"]))
    for split, ps in paths.items():
      self.assertLen(set(ps), len(ps))  # one example per file
      for p in ps:
        self.assertEqual(split_lib.split_of(p), split, p)
    fraction = len(paths["validation"]) / (len(paths["train"]) + len(paths["validation"]))
    self.assertBetween(fraction, 0.005, 0.08)

  def test_examples_are_the_stdlib_files(self):
    root = stdlib_corpus.stdlib_root()
    ds = self.splits["validation"]
    for i in range(len(ds)):
      ex = ds[i]
      rel = ex["path"].decode()
      self.assertTrue(rel.endswith(".py"))
      parts = rel.split("/")
      self.assertFalse({"site-packages", "test", "tests", "idle_test"} & set(parts), rel)
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        self.assertEqual(ex["text"].decode("utf-8"), f.read())

  def test_rebuild_is_deterministic_and_reused(self):
    other = stdlib_corpus.StdlibSource(data_dir=self.data_dir)
    other.download_and_prepare(file_format="array_record")  # reuses the build: no-op
    ds = other.as_data_source(split="validation")
    self.assertEqual([ds[i]["path"] for i in range(len(ds))],
                     [self.splits["validation"][i]["path"] for i in range(len(ds))])
    self.assertEqual(other.info.metadata["python_version"], self.builder.info.metadata["python_version"])


if __name__ == "__main__":
  absltest.main()
