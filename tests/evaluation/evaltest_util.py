"""Shared pieces of the evaluation tests: one tiny training run per session, eval.py in subprocesses.

The stdlib corpus and the trained `configs/tiny.py:test` workdir live in a scratch directory shared by
every pytest-xdist worker (conftest.py points `set_root` at it); `once(name, build)` builds each under
a file lock, so the first worker to ask does the work and the others reuse it. Subprocesses share a
JAX persistent compilation cache, so eval.py reuses the eval step the training run compiled.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import filelock

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TIMEOUT_S = 420
TRAIN_FLAGS = ("--config=configs/tiny.py:test",)  # 6 steps, eval at 3 and 6 on 2 batches, checkpoints 3 and 6

_root: pathlib.Path | None = None


def set_root(path: os.PathLike) -> None:
  global _root
  _root = pathlib.Path(path)
  _root.mkdir(parents=True, exist_ok=True)


def root() -> pathlib.Path:
  if _root is None:  # outside pytest
    set_root(tempfile.mkdtemp(prefix="evaluation_tests_"))
  return _root


def once(name: str, build) -> pathlib.Path:
  """`root()/name`, made by `build(path)` the first time any worker of the session asks for it."""
  path = root() / name
  with filelock.FileLock(str(path) + ".lock"):
    failed = pathlib.Path(str(path) + ".failed")
    if failed.exists():
      raise RuntimeError(f"building {name} failed earlier in this session:\n{failed.read_text()}")
    if not (path / ".done").exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir(parents=True)
      try:
        build(path)
      except BaseException as e:
        failed.write_text(f"{type(e).__name__}: {e}")
        raise
      (path / ".done").touch()
  return path


def data_dir() -> str:
  """TFDS data (stdlib corpus, arithmetic) built once into the shared scratch dir."""
  def build(path):
    from configs import common
    from data import arithmetic, sources
    cfg = common.data_defaults()
    cfg.data_dir = str(path)
    sources.prepare(cfg)
    arithmetic.builder(str(path))
  return str(once("tfds", build))


def env() -> dict:
  cache = root() / "jax_cache"
  cache.mkdir(exist_ok=True)
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           PYTHONUNBUFFERED="1")
  e.pop("PYTEST_XDIST_WORKER", None)
  e.pop("XLA_FLAGS", None)
  return e


def run(script: str, *flags: str) -> str:
  """Runs `python script flags` from the repo root; returns stdout (raises with the output on failure)."""
  proc = subprocess.run([PYTHON, str(REPO / script), *flags], cwd=REPO, env=env(), capture_output=True,
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


def metrics_rows(workdir: os.PathLike) -> list[dict]:
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]
