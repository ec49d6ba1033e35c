"""Expensive test artefacts (data builds, training runs), made once per pytest session.

They live in one scratch directory shared by every pytest-xdist worker of the session (tests/conftest.py
points `set_root` at it). `once(name, build)` makes one under a file lock, so whichever worker asks
first does the work and the others reuse it; a failed build is recorded and re-raised, not retried.
Subprocesses started through `subprocess_env` share one JAX persistent compilation cache there, so a
second run of an already compiled program costs seconds instead of a minute.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import filelock

REPO = pathlib.Path(__file__).resolve().parents[1]

_root: pathlib.Path | None = None


def set_root(path: os.PathLike) -> None:
  global _root
  _root = pathlib.Path(path)
  _root.mkdir(parents=True, exist_ok=True)


def root() -> pathlib.Path:
  if _root is None:  # outside pytest (a test module run directly)
    set_root(tempfile.mkdtemp(prefix="deepseek_jax_tests_"))
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
  """The TFDS datasets the runs use (stdlib corpus, arithmetic problems), built once (a few seconds)."""
  def build(path):
    from configs import common
    from data import arithmetic, sources
    cfg = common.data_defaults()
    cfg.data_dir = str(path)
    sources.prepare(cfg)
    arithmetic.builder(str(path))
  return str(once("tfds", build))


FAST_COMPILE = "--xla_backend_optimization_level=0"


def add_xla_flag(flag: str) -> None:
  """Appends `flag` to this process's XLA_FLAGS (before JAX starts its backend), unless already there."""
  flags = os.environ.get("XLA_FLAGS", "")
  if flag.split("=")[0] not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def subprocess_env(xla_flags: str | None = None) -> dict:
  """Environment for a CPU subprocess of the repo's scripts, with the session's compilation cache."""
  cache = root() / "jax_cache"
  cache.mkdir(exist_ok=True)
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONUNBUFFERED="1")
  env.pop("PYTEST_XDIST_WORKER", None)
  env["XLA_FLAGS"] = f"{xla_flags or ''} {FAST_COMPILE}".strip()  # the caller's flags, compiled fast
  return env


def metrics_rows(workdir: os.PathLike) -> list[dict]:
  """The rows of a run's metrics.jsonl."""
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]
