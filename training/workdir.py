"""A training workdir belongs to one run: a lock, its config.json as the contract, no silent restart.

  lock = workdir.Lock(path); lock.acquire() ... lock.release()   # one trainer per workdir
  workdir.check_resume(path, config, model_cfg, start_over=False)  # before anything is built

- The lock is `WORKDIR/run.lock`, held with `fcntl.flock` (the kernel releases it when the holder dies,
  even by SIGKILL) and naming the holder's host and pid. A lock file left by a dead process on this
  host is taken over with a warning; one held by a live process, or written by another host (whose
  processes cannot be checked from here), is an error naming the holder.
- `config.json` records what the checkpoints are: resuming with a different architecture (any
  `ModelConfig` field, whether or not it changes a shape), tokenizer, init_from or LoRA rank/targets is
  an error naming the fields.
  Execution settings (backend, attention kernel, remat, capacity) and run fields may change.
- A workdir with a history (metrics.jsonl) but no checkpoint to resume from is an error, unless the
  run says `start_over`: then the old files move to `WORKDIR/previous-<time>/`, never deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import ml_collections
from absl import logging

import models

LOCK_NAME = "run.lock"
RECORDS = ("config.json", "metrics.jsonl", "final_metrics.json", "tensorboard", "checkpoints")
TOKENIZER_FIELDS = ("tokenizer", "tokenizer_path")
LORA_FIELDS = ("rank", "targets")


class WorkdirInUseError(RuntimeError):
  pass


class Lock:
  """An exclusive, advisory lock on a workdir for the lifetime of one training run."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd = self._lock_file()
    holder = _read_holder(self.path)
    if holder and holder.get("pid") != me["pid"]:
      if holder.get("host") != me["host"]:
        os.close(fd)
        raise WorkdirInUseError(
            f"{os.path.dirname(self.path)} is locked by {_describe(holder)}, another host; this host cannot tell "
            f"whether that run is alive. If it is not, delete {self.path}")
      logging.warning("taking over %s from %s, which is no longer running", self.path, _describe(holder))
      print(f"WARNING: took over the workdir lock of {_describe(holder)}, which is no longer running", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _lock_file(self) -> int:
    """An fd of the lock file, flock-ed. Retries when a releasing run unlinked the file between our
    open and our flock (we would hold a lock on a file nobody else can see)."""
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirInUseError(f"{os.path.dirname(self.path)} is in use by {_describe(_read_holder(self.path))} "
                                f"(lock {self.path}); one run per workdir") from None
      try:
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          return fd
      except FileNotFoundError:
        pass
      os.close(fd)
    raise WorkdirInUseError(f"could not take {self.path}: other runs keep replacing it")

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still holding it: a waiting run then creates a fresh file
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "another run (no holder recorded)"
  return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a run ConfigDict: `model` for `models.from_dict`, `execution` for
  `sharding.make_execution`. Workdirs written before the execution section existed (execution fields
  inside `model`) read the same."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir (train.py --workdir)?")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it records the run's model and data") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
    raise ValueError(f"{path} has no `model` section: not a run config written by train.py")
  if "execution" not in raw:
    model = raw["model"]
    raw["execution"] = {k: model.pop(k) for k in models.EXECUTION_FIELDS if k in model}
  return ml_collections.ConfigDict(raw)


def has_history(workdir: str) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.isfile(path) and os.path.getsize(path) > 0


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of WORKDIR/checkpoints/<step> directories, sorted."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def has_checkpoints(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir))


def check_resume(workdir: str, config, model_cfg: models.ModelConfig, *, start_over: bool = False) -> None:
  """Raises ValueError when `config` cannot continue what `workdir` holds (see the module docstring);
  with start_over, moves the old run's records aside instead."""
  history, checkpoints = has_history(workdir), has_checkpoints(workdir)
  if start_over:
    if history or checkpoints or os.path.exists(os.path.join(workdir, "config.json")):
      _move_aside(workdir)
    return
  if checkpoints or history:
    differences = _differences(workdir, config, model_cfg)
    if differences:
      raise ValueError(f"{workdir} holds a run of a different model or tokenizer than this config: "
                       + "; ".join(differences) + ". Use a new workdir, or pass --start_over to move the "
                       "old run aside.")
  if history and not checkpoints:
    raise ValueError(f"{workdir} has a training history (metrics.jsonl) but no checkpoint to resume from: "
                     "starting again would append a second history to the first. Pass --start_over to move "
                     "the old records aside, or use a new workdir.")


def _differences(workdir: str, config, model_cfg: models.ModelConfig) -> list[str]:
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return []  # a run killed before it wrote its config: nothing to compare
  saved = read_run_config(workdir)
  try:
    saved_model = models.from_dict(saved.model.to_dict())
  except (ValueError, TypeError) as e:
    raise ValueError(f"{workdir}/config.json does not describe a valid model ({e})") from None
  out = [f"model.{name}: {getattr(saved_model, name)!r} in the workdir, {getattr(model_cfg, name)!r} now"
         for name in models.ModelConfig.__dataclass_fields__
         if getattr(saved_model, name) != getattr(model_cfg, name)]
  saved_data = saved.get("data", {})
  for name in TOKENIZER_FIELDS:
    before, now = saved_data.get(name, ""), config.data.get(name, "")
    if before != now:
      out.append(f"data.{name}: {before!r} in the workdir, {now!r} now")
  where = lambda v: os.path.abspath(os.path.expanduser(v)) if v else ""
  before, now = where(saved.get("init_from", "")), where(config.get("init_from", ""))
  if before != now:
    out.append(f"init_from: {before!r} in the workdir, {now!r} now")
  saved_lora, lora_now = saved.get("lora", {}), config.get("lora", {})
  if saved_lora.get("rank") or lora_now.get("rank"):  # what the checkpoints' adapters are
    out.extend(f"lora.{name}: {saved_lora.get(name)!r} in the workdir, {lora_now.get(name)!r} now"
               for name in LORA_FIELDS if saved_lora.get(name) != lora_now.get(name))
  return out


def _move_aside(workdir: str) -> None:
  aside = os.path.join(workdir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
  os.makedirs(aside)
  for name in RECORDS:
    src = os.path.join(workdir, name)
    if os.path.exists(src):
      os.rename(src, os.path.join(aside, name))
  print(f"--start_over: moved the previous run's records to {aside}", flush=True)
