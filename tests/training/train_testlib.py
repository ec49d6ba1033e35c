"""Shared pieces of the training tests: train.py runs in subprocesses, each made once per session
(through session_scratch.once) and shared by the pytest-xdist workers."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import filelock

from session_scratch import REPO, data_dir, metrics_rows, once, root, set_root, subprocess_env  # noqa: F401

DRIVER = pathlib.Path(__file__).with_name("train_driver.py")
PYTHON = sys.executable
TIMEOUT_S = 480

# configs/tiny.py:test (its model) with the run fields the tests rely on spelled out, so edits to the
# config file do not silently change what is tested. Schedule: peak 3e-3 for steps 1-4, then cosine.
# Routing is dropless: the capacity backend drops tokens depending on how many share a (micro)batch
# or an expert shard, so neither gradient accumulation nor expert parallelism is exact under it.
CONFIG_FLAGS = (
    "--config=configs/tiny.py:test",
    "--config.total_steps=6",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.checkpoint_every=3",
    "--config.eval_every=3",
    "--config.eval_batches=2",
    "--config.log_every=1",
    "--config.keep_checkpoints=3",
    "--config.optim.peak_lr=3e-3",
    "--config.optim.min_lr_ratio=0.1",
    "--config.optim.warmup_fraction=0.05",
    "--config.optim.decay_start_fraction=0.5",
    "--config.execution.moe_backend=dropless",
)
STEPS = 6

def env(devices: int = 1) -> dict:
  return subprocess_env(f"--xla_force_host_platform_device_count={devices}")


def log_tail(log: pathlib.Path, n: int = 3000) -> str:
  """The end of a run's output without absl's INFO lines (orbax is chatty)."""
  lines = [l for l in log.read_text(errors="replace").splitlines() if not l.startswith(("I0", "I1"))]
  return "\n".join(lines)[-n:]


def command(workdir, *flags, hook: dict | None = None) -> list[str]:
  """train.py (train_driver.py with a hook) on CONFIG_FLAGS; later `flags` override earlier ones."""
  entry = str(DRIVER if hook else REPO / "train.py")
  data = f"--config.data.data_dir={data_dir()}"
  return [PYTHON, entry, *CONFIG_FLAGS, data, f"--workdir={workdir}", *flags]


def start(workdir, *flags, devices: int = 1, hook: dict | None = None,
          log_name: str | None = None) -> tuple[subprocess.Popen, pathlib.Path]:
  """Starts a run on `devices` fake CPU devices; output goes to <workdir's parent>/<log_name>.log."""
  workdir = pathlib.Path(workdir)
  log = workdir.parent / f"{log_name or workdir.name}.log"
  e = env(devices)
  if hook:
    e["TRAIN_TEST_HOOK"] = json.dumps(hook)
  with open(log, "ab") as f:
    proc = subprocess.Popen(command(workdir, *flags, hook=hook), cwd=REPO, env=e, stdout=f,
                            stderr=subprocess.STDOUT)
  return proc, log


def run(workdir, *flags, devices: int = 1, hook: dict | None = None, expect_rc: int | None = 0) -> int:
  """Runs train.py (or the hooked driver) to completion; raises with the log tail on another rc.
  Output goes to <workdir>.log beside the workdir (reruns append to it)."""
  proc, log = start(workdir, *flags, devices=devices, hook=hook)
  try:
    rc = proc.wait(TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  if expect_rc is not None and rc != expect_rc:
    raise AssertionError(f"train.py exited {rc}, expected {expect_rc}; {log}:\n{log_tail(log)}")
  return rc


def wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited {proc.returncode} before {path.name} appeared")
    if time.monotonic() > deadline:
      proc.send_signal(signal.SIGKILL)
      raise AssertionError(f"{path} did not appear within {timeout} s")
    time.sleep(0.1)


def logged(workdir, key: str = "train/loss") -> dict[int, float]:
  """step → the last value of `key` logged for that step (a resumed run re-logs the steps it redoes)."""
  return {row["step"]: row[key] for row in metrics_rows(workdir) if key in row}


def checkpoint_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def copy_until(src, dst, step: int) -> pathlib.Path:
  """A copy of run `src` as if it had stopped right after checkpoint `step`."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".done"))
  for s in checkpoint_steps(dst):
    if s > step:
      shutil.rmtree(dst / "checkpoints" / str(s))
  rows = [r for r in metrics_rows(dst) if r["step"] <= step]
  (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return dst


def reference() -> pathlib.Path:
  """The uninterrupted 6-step run on one device that the other runs are compared with."""
  return once("reference", lambda p: run(p / "run")) / "run"


def max_rel_diff(a: dict, b: dict, steps) -> float:
  return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def max_abs_diff(a: dict, b: dict, steps) -> float:
  return max(abs(a[s] - b[s]) for s in steps)


def record(name: str, value) -> None:
  """Appends a measured number to root()/measurements.jsonl (for the report; not an assertion)."""
  with filelock.FileLock(str(root() / "measurements.lock")):
    with open(root() / "measurements.jsonl", "a") as f:
      f.write(json.dumps({"name": name, "value": value}) + "\n")
