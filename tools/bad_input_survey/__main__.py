"""Runs the survey: `python -m tools.bad_input_survey [--out=FILE] [--only=TEXT]` (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np

import inference
import models
from configs import common
from data import sources
from tools import bad_input_survey
from tools.bad_input_survey.cli_cases import cli_cases
from tools.bad_input_survey.config_cases import config_cases
from tools.bad_input_survey.data_cases import data_cases
from tools.bad_input_survey.generation_cases import _PROMPTS, _model, generation_cases
from tools.bad_input_survey.harness import ENV, Case, Compiled, Mishandled, _config, _train, judge
from tools.bad_input_survey.hf_cases import _hf_copy, hf_cases
from tools.bad_input_survey.report import _COLUMNS, _markdown, _row, _summary
from tools.bad_input_survey.workdir_cases import checkpoint_cases, workdir_cases


def _control_train():
  try:
    _train(_config())
  except Compiled:
    return "tiny:test reaches compilation"
  raise Mishandled("train_and_evaluate returned without compiling")


def _control_generate():
  tokens = np.asarray(inference.generate(_model(), _PROMPTS, 3))
  if tokens.shape != (2, 7):
    raise Mishandled(f"generate gave shape {tokens.shape}")
  return "generate on the tiny model gives [2, 7] tokens"


def _control_hf():
  return f"loads, hidden_size {models.load_hf_checkpoint(str(_hf_copy())).cfg.hidden_size}"


CONTROLS = [Case("control", "valid config", _control_train, None),
            Case("control", "valid generation", _control_generate, None),
            Case("control", "unmodified HF fixture", _control_hf, None)]


@contextlib.contextmanager
def _stderr_to(path: pathlib.Path):
  """Sends this process's stderr (Python, absl and C++ logs, progress bars) to `path` while inside."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "ab") as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def main() -> int:
  parser = argparse.ArgumentParser(description=bad_input_survey.__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the report as Markdown to this file")
  parser.add_argument("--only", default="", help="run only cases whose area or name contains this")
  args = parser.parse_args()
  start = time.time()
  with tempfile.TemporaryDirectory(prefix="bad_input_survey_") as root:
    ENV.start(root)
    log = ENV.root / "survey.log"
    print(f"building the shared data dir; logs of the code under test go to {log} (deleted at the end)",
          flush=True)
    with _stderr_to(log), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      cfg = common.data_defaults()
      cfg.data_dir = ENV.data_dir
      sources.prepare(cfg)
      cases = (config_cases() + cli_cases() + workdir_cases() + checkpoint_cases() + hf_cases()
               + generation_cases() + data_cases())
    cases = [c for c in cases if args.only in f"{c.area}: {c.name}"]
    widths = [4, 16, 52, 30, 8, 0]
    fmt = lambda row: "  ".join(c.ljust(w)[:max(w, len(c))] if w else c for c, w in zip(row, widths))
    controls, results, rows = [], [], []
    for group, todo in (("controls", CONTROLS), ("cases", cases)):
      print(f"\n{group}:\n" + fmt(_COLUMNS), flush=True)
      for case in todo:
        with _stderr_to(log), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
          warnings.simplefilter("ignore")
          result = judge(case)
        (controls if group == "controls" else results).append(result)
        row = _row(len(controls) if group == "controls" else len(results), result)
        if group == "cases":
          rows.append(row)
        print(fmt(row), flush=True)
    summary = _summary(results, time.time() - start)
    print("\n" + "\n".join(summary))
    bad_controls = [r for r in controls if r.outcome != "handled"]
    if bad_controls:
      print("CONTROL FAILED: the cases above are not meaningful until it works:\n"
            + (ENV.root / "survey.log").read_text()[-3000:])
    if args.out:
      command = f"JAX_PLATFORMS=cpu python -m tools.bad_input_survey --out={args.out}"
      pathlib.Path(args.out).write_text(_markdown(rows, controls, summary, command))
      print(f"wrote {args.out}")
  return 1 if bad_controls else 0


if __name__ == "__main__":
  sys.exit(main())
