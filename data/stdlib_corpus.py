"""The embedded default corpus: the Python standard library's own `.py` source files.

Every Python installation carries its standard library, so this dataset needs no download. Each
example is one source file: `text` (the file, decoded as UTF-8) and `path` (its path relative to the
stdlib root, e.g. `json/decoder.py`). Files are split into train/validation by a stable hash of that
path (`data.split`, 3 % validation by count), so a file never appears in both splits.

Which files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, excluding `site-packages` /
`dist-packages` (third-party code), `__pycache__`, the build `config-*` directory, empty files, files
that are not valid UTF-8 and binary ones (`text_files.skip_reason`; CPython 3.12 has none). Config
`lib` (the default) also excludes the test suites (`test/`, `*/tests/`, `idlelib/idle_test/`): they
hold ~2/3 of the bytes but are mostly generated data tables, deliberately odd syntax and encoding
fixtures, so the default corpus is the library code a model should learn from. Config `full` keeps
them (`python_stdlib/full`).

The corpus is whatever this Python ships: a different Python version gives a different (but still
deterministic) dataset. The builder records the version it read in the dataset metadata; builds are
reused from the data dir, so delete `<data_dir>/python_stdlib` after a Python upgrade to rebuild.

  builder = StdlibSource(data_dir=...)
  builder.download_and_prepare(file_format="array_record")   # ~1 s, once
  train = builder.as_data_source(split="train")              # random access, no TensorFlow
"""

import dataclasses
import os
import platform
import sysconfig

from absl import logging
import tensorflow_datasets as tfds

from data import split as split_lib
from data import text_files

_ALWAYS_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclasses.dataclass(eq=False)
class StdlibConfig(tfds.core.BuilderConfig):
  include_tests: bool = False


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str, include_tests: bool) -> list[str]:
  """Relative paths of the stdlib `.py` files to read, sorted (the build is order-independent anyway)."""
  skipped = _ALWAYS_SKIPPED_DIRS if include_tests else _ALWAYS_SKIPPED_DIRS | _TEST_DIRS
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skipped and not d.startswith("config-")]
    for name in filenames:
      if name.endswith(".py"):
        out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(out)


def read_utf8(path: str) -> str | None:
  """The file's text, or None for files that are unreadable, not UTF-8, or no text by the rule of the
  text_files builder (empty, whitespace-only, or binary: a NUL, or > 10 % control characters)."""
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return None
  return None if text_files.skip_reason(text) else text


class StdlibSource(tfds.core.GeneratorBasedBuilder):
  """Python standard library source files, one example per file."""

  name = "python_stdlib"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stdlib .py files; split by a sha256 of the relative path, 3 % validation."}
  BUILDER_CONFIGS = [
      StdlibConfig(name="lib", description="Library code only (test suites excluded)."),
      StdlibConfig(name="full", description="Library code and its test suites.", include_tests=True),
  ]
  DEFAULT_CONFIG_NAME = "lib"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "The .py files of the Python standard library this dataset was built from "
            f"(Python {platform.python_version()}, {stdlib_root()})."
        ),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(python_version=platform.python_version()),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = stdlib_root()
    files = list_stdlib_files(root, self.builder_config.include_tests)
    by_split = {"train": [], "validation": []}
    for rel in files:
      by_split[split_lib.split_of(rel)].append(rel)
    return {name: self._generate_examples(root, rels) for name, rels in by_split.items() if rels}

  def _generate_examples(self, root, rels):
    skipped = 0
    for rel in rels:
      text = read_utf8(os.path.join(root, rel))
      if text is None:
        skipped += 1
        continue
      yield rel, {"text": text, "path": rel}
    # Reached once TFDS has drained the generator, i.e. once per split.
    logging.info("python_stdlib: skipped %d of %d files (empty, not UTF-8 or binary).", skipped, len(rels))
