"""The survey's machinery: the case type and how an outcome is judged (with the compile probe), and the
fixtures every area shares (one temporary root, one data dir, small configs and workdirs)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import re
from typing import Any, Callable
from unittest import mock

import jax
import ml_collections

import models
from configs import tiny
from training import loop

REPO = pathlib.Path(__file__).resolve().parents[2]
HF_FIXTURE = REPO / "tests" / "fixtures" / "hf" / "v3_tiny"

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------
# Cases and how they are judged.

class Compiled(Exception):
  """Raised in place of compiling: the code under test got that far without an error."""


class Mishandled(Exception):
  """A `handled` case whose situation was not dealt with correctly."""


@dataclasses.dataclass
class Case:
  area: str
  name: str
  run: Callable[[], Any]  # error cases: raises; handled cases: returns a note, raises Mishandled if wrong
  types: tuple[type, ...] | None = (ValueError,)  # None: a `handled` case
  says: tuple = ()  # substrings the message must hold; a tuple inside is a choice of spellings
  check_error: Callable[[BaseException], str | None] | None = None  # a further demand on the error


@dataclasses.dataclass
class Result:
  case: Case
  outcome: str  # "clear error" | "handled" | "PROBLEM"
  compile: str  # "before" | "reached" | "" (no compile probe)
  message: str
  why: str = ""  # what is wrong, for a PROBLEM


_probe = {"armed": False, "reached": False}  # the compile probe of the case being run


def _reached_compile(*args, **kwargs):
  _probe["reached"] = True
  raise Compiled("jax.jit was called")


def _headline(e: BaseException) -> str:
  """The first line of an error message; a header line ending in ':' takes the next line along."""
  text = getattr(e, "headline", None) or str(e) or type(e).__name__
  lines = [l.strip() for l in text.splitlines() if l.strip()] or [""]
  line = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
  return f"{type(e).__name__}: {line}"


def _missing(text: str, says) -> list[str]:
  out = []
  for want in says:
    choices = want if isinstance(want, tuple) else (want,)
    if not any(c in text for c in choices):
      out.append(" or ".join(repr(c) for c in choices))
  return out


def judge(case: Case) -> Result:
  _probe.update(armed=False, reached=False)
  try:
    value = case.run()
  except Compiled:  # handled cases that should go on to compile catch it themselves
    return _result(case, "PROBLEM", "reached compilation without an error", "no error before compiling")
  except Mishandled as e:
    return _result(case, "PROBLEM", str(e), "mishandled")
  except (Exception, SystemExit) as e:  # noqa: BLE001 - judging any error is the point
    message = _headline(e)
    if case.types is None:
      return _result(case, "PROBLEM", message, "raised where it should have coped")
    if not isinstance(e, case.types):
      expected = " or ".join(t.__name__ for t in case.types)
      return _result(case, "PROBLEM", message, f"{type(e).__name__}, not {expected}")
    missing = _missing(str(e), case.says)
    if missing:
      return _result(case, "PROBLEM", message, f"message lacks {', '.join(missing)}")
    further = case.check_error(e) if case.check_error else None
    if further:
      return _result(case, "PROBLEM", message, further)
    if _probe["reached"]:
      return _result(case, "PROBLEM", message, "error only once compiling began")
    return _result(case, "clear error", message)
  if case.types is None:
    return _result(case, "handled", str(value))
  return _result(case, "PROBLEM", f"no error ({str(value)[:120]})", "no error")


def _result(case, outcome, message, why="") -> Result:
  compile_ = ("reached" if _probe["reached"] else "before") if _probe["armed"] else ""
  return Result(case, outcome, compile_, message, why)


# ---------------------------------------------------------------------------------------------------
# Shared fixtures: one temporary root, one data dir, small configs and workdirs.

class Env:
  """The survey's temporary root and the data dir every training case shares (built once); __main__
  starts it once the root exists."""

  def start(self, root: str):
    self.root = pathlib.Path(root)
    self.data_dir = str(self.root / "tfds")
    self._n = 0

  def new_dir(self, name: str = "d") -> pathlib.Path:
    self._n += 1
    path = self.root / f"{self._n:03d}_{re.sub(r'[^A-Za-z0-9]+', '_', name)[:40]}"
    path.mkdir()
    return path


ENV = Env()  # started in __main__


def _config(fields: dict | None = None, **data) -> ml_collections.ConfigDict:
  """configs/tiny.py:test on the shared data dir, with dotted `fields` set to any value of any type
  (the config is rebuilt from a plain dict, as if read from JSON, so no ml_collections type check
  stands between a wrong type and the code under test). `data` overrides data fields."""
  d = tiny.get_config("test").to_dict()
  d["data"].update({"data_dir": ENV.data_dir, **data})
  for key, value in (fields or {}).items():
    node = d
    *parents, name = key.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  return ml_collections.ConfigDict(d)


def _train(config, workdir=None, start_over: bool = False) -> str:
  """train_and_evaluate up to (not into) its first compilation: raises Compiled once jax.jit is called."""
  workdir = ENV.new_dir("workdir") if workdir is None else workdir
  _probe["armed"] = True
  with mock.patch.object(jax, "jit", side_effect=_reached_compile):
    loop.train_and_evaluate(config, str(workdir), start_over=start_over)
  return "finished"


def _fails_to_train(fields: dict):
  return lambda: _train(_config(fields))


def _write_run(path: pathlib.Path, config, *, checkpoints=True, history=True) -> pathlib.Path:
  """The records a run leaves: config.json as the loop writes it, a metrics line, a checkpoint dir."""
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model = models.from_dict(config.model.to_dict()).to_dict()
  (path / "config.json").write_text(saved.to_json_best_effort())
  if history:
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
  if checkpoints:
    (path / "checkpoints" / "3").mkdir(parents=True)
  return path


@contextlib.contextmanager
def _captured_logs():
  """The records of warnings logged through absl while inside."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("absl")
  logger.addHandler(handler)
  try:
    yield records
  finally:
    logger.removeHandler(handler)

