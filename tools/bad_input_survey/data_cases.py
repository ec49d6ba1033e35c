"""Data: text/JSONL files and tokenizers (data/text_files.py, data/tokenizers.py, data/sources.py)."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

from data import sources

from tools.bad_input_survey.harness import (ENV, Case, Compiled, Mishandled, _captured_logs, _config,
                                            _fails_to_train, _train)


_GOOD_DOC = "def f(x):\n    return x + 1\n"


def _corpus(files: dict[str, bytes], good: int = 30) -> pathlib.Path:
  """A directory of `good` ordinary .txt documents (enough for both splits) plus `files`."""
  root = ENV.new_dir("corpus")
  for i in range(good):
    (root / f"good{i:02d}.txt").write_text(f"# document {i}\n{_GOOD_DOC * (i + 1)}")
  for name, data in files.items():
    (root / name).write_bytes(data)
  return root


def _text_files(files: dict[str, bytes], good: int = 30, pattern: str = ""):
  """Trains on a corpus of `files` (a fresh data dir, so it is built anew)."""
  def run():
    root = _corpus(files, good)
    return _train(_config(dataset="text_files", text_files=str(root / pattern) if pattern else str(root),
                          data_dir=str(ENV.new_dir("tfds"))))
  return run


def _skipped_file(name: str, data: bytes, reason: str):
  """A corpus with one file that is no text: the build must skip it, say so, and keep the others."""
  def run():
    root = _corpus({name: data})
    config = _config(dataset="text_files", text_files=str(root), data_dir=str(ENV.new_dir("tfds")))
    with _captured_logs() as logs, contextlib.redirect_stdout(io.StringIO()):
      try:
        _train(config)
      except Compiled:
        pass
    builder = sources.get_builder(config.data)
    paths = [ex["path"].decode() if isinstance(ex["path"], bytes) else ex["path"]
             for split in builder.info.splits for ex in builder.as_data_source(split=split)]
    said = " | ".join(r.getMessage() for r in logs if "skip" in r.getMessage())
    if name in paths:
      raise Mishandled(f"{name} became a training document")
    if len(paths) != 30:
      raise Mishandled(f"{len(paths)} documents kept, not the 30 good ones")
    if reason not in said:
      raise Mishandled(f"no warning saying {reason!r}: {said[:200]!r}")
    return f"kept the 30 others; logged: {said[:150]}"
  return run


def _tokenizer(kind: str, name: str, data: bytes | None, *, point_at_dir: bool = False):
  """Trains with a tokenizer file `name` holding `data` (None: the file does not exist); tokenizer_path
  names that file, or with point_at_dir its directory."""
  def run():
    path = ENV.new_dir("tokenizer") / name
    if data is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
    return _train(_config(tokenizer=kind, tokenizer_path=str(path.parent if point_at_dir else path)))
  return run


def _corrupt_build():
  data_dir = ENV.new_dir("tfds_corrupt")
  (data_dir / "python_stdlib" / "lib" / "1.0.0").mkdir(parents=True)  # interrupted: no dataset_info.json
  return _train(_config(data_dir=str(data_dir)))


def _data_dir_is_a_file():
  path = ENV.new_dir("tfds_file") / "data"
  path.write_text("")
  return _train(_config(data_dir=str(path)))


def data_cases() -> list[Case]:
  jsonl = lambda *lines: b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines)
  ok = json.dumps({"text": _GOOD_DOC})

  def error(name, run, *says):
    return Case("data", name, run, says=says)

  return [
      Case("data", "text file of NUL bytes among good ones", _skipped_file("nul.txt", b"\0" * 500, "1 NUL"), None),
      Case("data", "text file that is not UTF-8 among good ones",
           _skipped_file("latin1.txt", "café résumé\n".encode("latin-1") * 20, "latin1.txt"), None),
      error("every file binary (NUL bytes)", _text_files({"a.txt": b"\0" * 100, "b.txt": b"\x01\x02" * 50}, good=0),
            "No usable document", "NUL"),
      error("every file empty or whitespace", _text_files({"a.txt": b"", "b.txt": b"  \n\n"}, good=0),
            "No usable document", "empty"),
      error("JSONL line that is not UTF-8", _text_files({"d.jsonl": jsonl(ok, b'{"text": "caf\xe9"}')}),
            "d.jsonl:2", "UTF-8"),
      error("JSONL line that is not JSON", _text_files({"d.jsonl": jsonl(ok, ok, '{"text": "x"')}), "d.jsonl:3"),
      error("JSONL record without a text field", _text_files({"d.jsonl": jsonl(ok, '{"body": "x"}')}),
            "d.jsonl:2", "text"),
      error("JSONL text that is a number", _text_files({"d.jsonl": jsonl('{"text": 42}')}), "d.jsonl:1", "text"),
      error("JSONL line that is a list", _text_files({"d.jsonl": jsonl(ok, '["text"]')}), "d.jsonl:2"),
      error("text_files glob matching nothing", _text_files({}, good=0, pattern="*.md"), "*.md", "matches no files"),
      error("dataset text_files without a pattern", lambda: _train(_config(dataset="text_files", text_files="")),
            "text_files"),
      error("data_dir is a regular file", _data_dir_is_a_file, "data_dir", "not a directory"),
      error("interrupted dataset build in data_dir", _corrupt_build, "incomplete or corrupt", "dataset_info.json"),
      error("sentencepiece model file of garbage", _tokenizer("sentencepiece", "spm.model", b"not a protobuf \xff"),
            "spm.model", "SentencePiece"),
      error("sentencepiece model file missing", _tokenizer("sentencepiece", "none.model", None),
            "none.model", "not found"),
      error("tokenizer.json that is not JSON", _tokenizer("hf", "tok/tokenizer.json", b"{not json"),
            "tokenizer.json", "not a valid"),
      error("tokenizer.json that is JSON but no tokenizer",
            _tokenizer("hf", "tok/tokenizer.json", b'{"version": "1.0"}'), "tokenizer.json"),
      error("hf tokenizer directory without tokenizer.json",
            _tokenizer("hf", "tok/README", b"hello", point_at_dir=True), "tokenizer.json", "not found"),
      error("tokenizer vocab 256 > model vocab_size 128", _fails_to_train({"model.vocab_size": 128}),
            "vocab_size", "128", "256"),
  ]
