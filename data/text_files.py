"""Bring your own data: a TFDS builder over local text files and JSONL files.

  builder = TextFiles(pattern="~/corpus/**/*.jsonl", data_dir=...)
  builder.download_and_prepare(file_format="array_record")
  train = builder.as_data_source(split="train")

or, through the pipeline, `data_config.dataset = "text_files"` and `data_config.text_files = <glob>`.

`pattern` is a glob (`**` recurses) or a directory (every `*.txt` and `*.jsonl` below it). A file
ending in `.jsonl` holds one JSON object per line and each object's `text` field is a document (blank
lines are skipped; a line that is not UTF-8, not JSON or lacks a string `text` is an error naming file
and line). Any other file is one UTF-8 document (files that do not decode are skipped with a warning).
Examples have `text` and `path` (the file path relative to the pattern's fixed prefix, plus `:line` for
JSONL records).

Documents that are no text are skipped, and the build logs how many and why (`skip_reason`): empty or
whitespace-only ones, and binary data: any NUL character, or more than 10 % of the characters C0
controls other than tab, newline, carriage return and form feed. Trained on, such bytes would be
targets like any other token. (NUL is also the byte tokenizer's pad/EOS id 0, which is why that
tokenizer drops NUL from any text it encodes.)

Split: the same stable hash as the stdlib corpus (`data.split`), of the file path for text files and of
`path:line` for JSONL records (so one large JSONL file still gets a validation split). With very few
documents a split can come out empty; it is then left out of the build, asking for it raises a
ValueError, and `validation_percent` (constructor argument) can be raised.

Each distinct (pattern, file list, sizes, modification times, validation_percent) gets its own builder
config, named by a hash of them, so editing or adding a file triggers a fresh build instead of silently
reusing stale data. Old builds stay in the data dir until you delete them.
"""

import collections
import dataclasses
import glob
import hashlib
import json
import os

from absl import logging
import tensorflow_datasets as tfds

from data import split as split_lib

_DIRECTORY_SUFFIXES = (".txt", ".jsonl")
_GLOB_CHARS = frozenset("*?[")
# C0 control characters that plain text does not hold, for str.translate to delete (tab, newline,
# carriage return and form feed are text; Python source uses form feeds as page breaks).
_CONTROLS = dict.fromkeys(c for c in range(32) if chr(c) not in "\t\n\r\f")
MAX_CONTROL_FRACTION = 0.1


def skip_reason(text: str) -> str | None:
  """Why `text` is not a training document ("empty", "NUL", "control characters"), or None if it is one."""
  if not text.strip():
    return "empty"
  if "\0" in text:
    return "NUL"
  controls = len(text) - len(text.translate(_CONTROLS))
  if controls > MAX_CONTROL_FRACTION * len(text):
    return "control characters"
  return None


def _skipped_summary(skipped: collections.Counter) -> str:
  """E.g. "3 documents (1 NUL, 2 empty)"."""
  why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
  return f"{sum(skipped.values())} documents ({why})" if skipped else "no documents"


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  pattern: str = ""
  root: str = ""  # keys (paths) are relative to this
  validation_percent: float = split_lib.VALIDATION_PERCENT


def _static_prefix(pattern: str) -> str:
  """The leading directories of a glob that contain no wildcard."""
  parts = pattern.split(os.sep)
  kept = []
  for part in parts[:-1]:
    if _GLOB_CHARS & set(part):
      break
    kept.append(part)
  return os.sep.join(kept) or os.curdir


def resolve_files(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted absolute file paths) for a glob or a directory. Raises ValueError if none match."""
  if not pattern:
    raise ValueError("dataset 'text_files' needs a glob or directory: set data_config.text_files.")
  expanded = os.path.expanduser(pattern)
  if os.path.isdir(expanded):
    root = expanded
    files = [p for suffix in _DIRECTORY_SUFFIXES
             for p in glob.glob(os.path.join(glob.escape(expanded), "**", "*" + suffix), recursive=True)]
  else:
    root = _static_prefix(expanded)
    files = glob.glob(expanded, recursive=True)
  files = sorted({os.path.abspath(p) for p in files if os.path.isfile(p)})
  if not files:
    raise ValueError(f"text_files pattern {pattern!r} matches no files.")
  return os.path.abspath(root), files


def make_config(pattern: str, validation_percent: float = split_lib.VALIDATION_PERCENT) -> TextFilesConfig:
  """A builder config for `pattern`, named by a fingerprint of the files it matches right now."""
  root, files = resolve_files(pattern)
  h = hashlib.sha256(f"{root}\n{validation_percent}\n".encode())
  for path in files:
    st = os.stat(path)
    h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return TextFilesConfig(
      name="f" + h.hexdigest()[:16],
      description=f"{len(files)} files matching {pattern!r}",
      pattern=pattern,
      root=root,
      validation_percent=validation_percent,
  )


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """Documents from local text / JSONL files."""

  name = "text_files"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Text files and JSONL `text` fields; split by sha256 of path[:line].",
                   "1.1.0": "Skips whitespace-only and binary documents (NUL, > 10 % control characters)."}

  def __init__(self, *, pattern: str | None = None, config: TextFilesConfig | None = None,
               validation_percent: float = split_lib.VALIDATION_PERCENT, **kwargs):
    if config is None:
      config = make_config(pattern or "", validation_percent)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Local text files: {self.builder_config.description}.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    # TFDS cannot write an empty split, and a tiny corpus may hash no document into validation:
    # count first (a cheap pass over keys), then generate only the non-empty splits.
    counts = {"train": 0, "validation": 0}
    skipped = collections.Counter()
    for key, _ in self._all_documents(skipped):
      counts[split_lib.split_of(key, self.builder_config.validation_percent)] += 1
    if skipped:
      logging.warning("text_files %r: skipped %s.", self.builder_config.pattern, _skipped_summary(skipped))
    if not any(counts.values()):
      raise ValueError(f"No usable document in {self.builder_config.pattern!r}: skipped "
                       f"{_skipped_summary(skipped)}.")
    return {name: self._generate_examples(name) for name, n in counts.items() if n}

  def _all_documents(self, skipped: collections.Counter | None = None):
    """(key, text) of every document to keep; counts the others by reason into `skipped` (and warns
    about undecodable files) when given, so that one pass over the files reports them once."""
    cfg = self.builder_config
    _, files = resolve_files(cfg.pattern)
    for path in files:
      rel = os.path.relpath(path, cfg.root).replace(os.sep, "/")
      for key, text in _documents(path, rel):
        reason = "not UTF-8" if text is None else skip_reason(text)
        if reason is None:
          yield key, text
        elif skipped is not None:
          skipped[reason] += 1
          if text is None:
            logging.warning("text_files: skipping %s (not UTF-8).", path)

  def _generate_examples(self, split_name):
    for key, text in self._all_documents():
      if split_lib.split_of(key, self.builder_config.validation_percent) == split_name:
        yield key, {"text": text, "path": key}


def _documents(path: str, rel: str):
  """(key, text) for each document in one file, skipped ones included; text is None for a text file
  that is not UTF-8."""
  if path.endswith(".jsonl"):
    # Bytes, decoded line by line: a decoding error then names its line (JSON lines end in \n).
    with open(path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte "
                           f"{e.start + 1} of the line).") from e
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e!r}).") from e
        if not isinstance(text, str):
          raise ValueError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}.")
        yield f"{rel}:{lineno}", text
  else:
    with open(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      text = None
    yield rel, text
