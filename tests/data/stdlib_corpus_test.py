"""The embedded corpus: built once from this Python's stdlib into a temporary data dir."""

import filecmp
import os
import shutil
import tempfile

from absl.testing import absltest

from data import split as split_lib
from data import stdlib_corpus

_VERSION_DIR = os.path.join("python_stdlib", "lib", "1.0.0")


def _files_and_mtimes(root: str) -> dict[str, int]:
  out = {}
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
  return out


def _examples(builder) -> dict[str, list[tuple[bytes, bytes]]]:
  out = {}
  for split in ("train", "validation"):
    ds = builder.as_data_source(split=split)
    out[split] = [(ds[i]["path"], ds[i]["text"]) for i in range(len(ds))]
  return out


class StdlibCorpusTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = tempfile.mkdtemp(prefix="stdlib_tfds_")
    cls.builder = stdlib_corpus.StdlibSource(data_dir=cls.data_dir)
    cls.builder.download_and_prepare(file_format="array_record")
    cls.splits = {s: cls.builder.as_data_source(split=s) for s in ("train", "validation")}

  def test_holds_every_nonempty_utf8_library_file_once(self):
    # Found here by a walk of our own: every .py outside third-party, cache, build-config and test dirs.
    root = stdlib_corpus.stdlib_root()
    skipped = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    expected = set()
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if d not in skipped and not d.startswith("config-")]
      for name in filenames:
        if not name.endswith(".py"):
          continue
        with open(os.path.join(dirpath, name), "rb") as f:
          data = f.read()
        try:
          if data.decode("utf-8").strip():
            expected.add(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
        except UnicodeDecodeError:
          pass
    paths = [ds[i]["path"].decode() for ds in self.splits.values() for i in range(len(ds))]
    self.assertLen(paths, len(expected))
    self.assertEqual(set(paths), expected)

  def test_read_utf8_skips_files_that_are_no_text(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    cases = {b"x = 1\n\f\ny = 2\n": "x = 1\n\f\ny = 2\n", b"x = '\0'\n": None,
             b"\x01\x02\x03 = 1\n": None, b" \n": None, b"x = '\xe9'\n": None}
    for i, (data, expected) in enumerate(cases.items()):
      path = os.path.join(tmp, f"m{i}.py")
      with open(path, "wb") as f:
        f.write(data)
      self.assertEqual(stdlib_corpus.read_utf8(path), expected, data)

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

  def test_second_prepare_reuses_the_build(self):
    # Backdate every file: a second prepare that rewrote anything would leave a newer mtime.
    for rel in _files_and_mtimes(self.data_dir):
      os.utime(os.path.join(self.data_dir, rel), ns=(10**18, 10**18))
    before = _files_and_mtimes(self.data_dir)
    other = stdlib_corpus.StdlibSource(data_dir=self.data_dir)
    other.download_and_prepare(file_format="array_record")
    self.assertEqual(_files_and_mtimes(self.data_dir), before)
    self.assertEqual(_examples(other), _examples(self.builder))
    self.assertEqual(other.info.metadata["python_version"], self.builder.info.metadata["python_version"])

  def test_rebuild_after_deleting_is_identical(self):
    copy = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), "data")
    shutil.copytree(self.data_dir, copy)
    shutil.rmtree(os.path.join(copy, "python_stdlib"))
    rebuilt = stdlib_corpus.StdlibSource(data_dir=copy)
    rebuilt.download_and_prepare(file_format="array_record")
    self.assertEqual(_examples(rebuilt), _examples(self.builder))  # same files, same order
    for split in ("train", "validation"):
      shard = os.path.join(_VERSION_DIR, f"python_stdlib-{split}.array_record-00000-of-00001")
      self.assertTrue(filecmp.cmp(os.path.join(self.data_dir, shard), os.path.join(copy, shard), shallow=False))


if __name__ == "__main__":
  absltest.main()
