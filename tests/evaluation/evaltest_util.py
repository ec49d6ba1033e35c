"""Shared pieces of the evaluation tests: one tiny training run per session, eval.py in subprocesses.

The trained `configs/tiny.py:test` workdir is made once per session (session_scratch.once) and shared by
the pytest-xdist workers; eval.py reuses the eval step the training run compiled (shared compilation cache).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from session_scratch import REPO, data_dir, metrics_rows, once, subprocess_env  # noqa: F401

PYTHON = sys.executable
TIMEOUT_S = 420
TRAIN_FLAGS = ("--config=configs/tiny.py:test",)  # 6 steps, eval at 3 and 6 on 2 batches, checkpoints 3 and 6


def run(script: str, *flags: str) -> str:
  """Runs `python script flags` from the repo root; returns stdout (raises with the output on failure)."""
  proc = subprocess.run([PYTHON, str(REPO / script), *flags], cwd=REPO, env=subprocess_env(), capture_output=True,
                        text=True, timeout=TIMEOUT_S)
  if proc.returncode:
    tail = "\n".join(l for l in (proc.stdout + proc.stderr).splitlines() if not l.startswith(("I1", "I0")))
    raise AssertionError(f"{script} {' '.join(flags)} exited {proc.returncode}:\n{tail[-4000:]}")
  return proc.stdout


def trained_workdir() -> pathlib.Path:
  """A finished tiny:test training run (6 steps), trained once per session."""
  data = data_dir()
  return once("run", lambda path: run("train.py", *TRAIN_FLAGS, f"--workdir={path}",
                                      f"--config.data.data_dir={data}"))


