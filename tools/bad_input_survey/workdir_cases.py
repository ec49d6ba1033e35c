"""Workdir: the lock, the resume contract, unwritable paths (training/workdir.py, training/validate.py);
checkpoints: training fallback (training/checkpoint.py) and evaluation restore (evaluation/restore.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from evaluation import restore
from training import checkpoint as ckpt_lib
from training import workdir as workdir_lib

from tools.bad_input_survey.harness import (ENV, HF_FIXTURE, Case, Compiled, Mishandled, _captured_logs, _config,
                                            _train, _write_run)


def _holding_the_lock():
  workdir = ENV.new_dir("locked")
  with workdir_lib.Lock(str(workdir)):  # a first run; the second below runs in this process too
    return _train(_config(), workdir)


def _lock_file(holder: dict) -> pathlib.Path:
  workdir = ENV.new_dir("lock_file")
  (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(holder))
  return workdir


def _stale_lock_taken_over():
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  workdir = _lock_file({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"})
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      _train(_config(), workdir)
    except Compiled:
      pass  # it went on to compile: the lock was taken
  if f"pid {dead.pid}" not in out.getvalue():
    raise Mishandled(f"no warning naming the dead holder pid {dead.pid}: {out.getvalue()[:200]!r}")
  if (workdir / workdir_lib.LOCK_NAME).exists():
    raise Mishandled("the lock file is still there after the run ended")
  return f"took over the lock of dead pid {dead.pid} with a warning; released it at the end"


def _resume_with(change: dict, data: dict | None = None):
  """A workdir holding a run of tiny:test, resumed with `change` (dotted fields) applied."""
  def run():
    workdir = _write_run(ENV.new_dir("resume"), _config())
    return _train(_config(change, **(data or {})), workdir)
  return run


def _history_without_checkpoint(start_over: bool):
  def run():
    workdir = _write_run(ENV.new_dir("history"), _config(), checkpoints=False)
    if not start_over:
      return _train(_config(), workdir)
    with contextlib.redirect_stdout(io.StringIO()):
      try:
        _train(_config(), workdir, start_over=True)
      except Compiled:
        pass
    aside = list(workdir.glob("previous-*/metrics.jsonl"))
    if len(aside) != 1 or (workdir / "metrics.jsonl").exists():
      raise Mishandled(f"old records not moved aside: {sorted(p.name for p in workdir.iterdir())}")
    return f"moved the old records to {aside[0].parent.name}/ and went on to compile"
  return run


def _workdir_config_json(text: str):
  def run():
    workdir = _write_run(ENV.new_dir("bad_config_json"), _config())
    (workdir / "config.json").write_text(text)
    return _train(_config(), workdir)
  return run


def _below_a_file():
  blocker = ENV.new_dir("unwritable") / "a_file"
  blocker.write_text("")
  return _train(_config(), blocker / "sub")


def _workdir_is_a_file():
  path = ENV.new_dir("file_workdir") / "workdir"
  path.write_text("")
  return _train(_config(), path)


def workdir_cases() -> list[Case]:
  host = socket.gethostname()
  in_use = (workdir_lib.WorkdirInUseError,)
  bad_model = json.dumps({"model": {**models.from_dict(_config().model.to_dict()).to_dict(),
                                    "num_experts_per_tok": 9}})
  return [
      Case("workdir", "a second run on a workdir in use", _holding_the_lock, in_use,
           (f"pid {os.getpid()}", host)),
      Case("workdir", "stale lock of a dead process", _stale_lock_taken_over, None),
      Case("workdir", "lock written on another host",
           lambda: _train(_config(), _lock_file({"host": "other-host", "pid": 4242, "since": "earlier"})),
           in_use, ("other-host", "4242", workdir_lib.LOCK_NAME)),
      Case("workdir", "resume with num_experts_per_tok 2 -> 3", _resume_with({"model.num_experts_per_tok": 3}),
           says=("num_experts_per_tok", "2", "3")),
      Case("workdir", "resume with rope_theta 1e4 -> 5e5", _resume_with({"model.rope_theta": 500000.0}),
           says=("rope_theta", "500000.0")),
      Case("workdir", "resume with n_group/topk_group 2/1 -> 4/2",
           _resume_with({"model.n_group": 4, "model.topk_group": 2}), says=("n_group", "topk_group")),
      Case("workdir", "resume with routed_scaling_factor 2.5 -> 1.0",
           _resume_with({"model.routed_scaling_factor": 1.0}), says=("routed_scaling_factor",)),
      Case("workdir", "resume with another tokenizer", _resume_with({}, {"tokenizer": "hf",
                                                                         "tokenizer_path": "/x/tok"}),
           says=("data.tokenizer", "'hf'")),
      Case("workdir", "history (metrics.jsonl) without a checkpoint", _history_without_checkpoint(False),
           says=("metrics.jsonl", "--start_over")),
      Case("workdir", "history without a checkpoint, --start_over", _history_without_checkpoint(True), None),
      Case("workdir", "workdir config.json is not JSON", _workdir_config_json("{not json"),
           says=("config.json", "not valid JSON")),
      Case("workdir", "workdir config.json has no model section", _workdir_config_json('{"seed": 0}'),
           says=("config.json", "model")),
      Case("workdir", "workdir config.json holds an invalid model", _workdir_config_json(bad_model),
           says=("config.json", "num_experts_per_tok")),
      Case("workdir", "workdir below a regular file (unwritable)", _below_a_file,
           says=("a_file/sub", "not writable")),
      Case("workdir", "workdir is a regular file", _workdir_is_a_file, says=("workdir", "not writable")),
  ]



def _tiny_checkpoints(directory: pathlib.Path, steps):
  """Orbax checkpoints of a two-array state (and a data iterator) at `steps`; cheap, nothing compiles.
  Returns the data iterator, which a restore needs."""
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt = ckpt_lib.Checkpointer(str(directory), keep=5, async_save=False)
  for step in steps:
    ckpt.save(step, {"w": np.full(4, float(step), np.float32), "b": np.zeros(2, np.float32)}, it, force=True)
  ckpt.close()
  return it


def _abstract():
  return {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "b": jax.ShapeDtypeStruct((2,), jnp.float32)}


def _corrupt(step_dir: pathlib.Path):
  """Empties every array file of a checkpoint step: what a disk-full or interrupted copy leaves."""
  for path in step_dir.rglob("*"):
    if path.is_file() and "state" in path.parts and not path.name.startswith("_"):
      path.write_bytes(b"")


def _newest_checkpoint_corrupt():
  directory = ENV.new_dir("ckpt_fallback") / "checkpoints"
  it = _tiny_checkpoints(directory, [1, 2])
  _corrupt(directory / "2")
  ckpt = ckpt_lib.Checkpointer(str(directory), keep=5)
  with contextlib.redirect_stdout(io.StringIO()):
    state, step = ckpt.restore_latest(_abstract(), it)
  ckpt.close()
  if step != 1 or float(np.asarray(state["w"])[0]) != 1.0:
    raise Mishandled(f"restored step {step}, w={state and np.asarray(state['w'])}; expected step 1")
  aside = [p.name for p in directory.iterdir() if p.name.startswith("2.unreadable")]
  if not aside:
    raise Mishandled("the unreadable step 2 was not set aside")
  return f"fell back to step 1; set step 2 aside as {aside[0].split('-')[0]}-<time>"


def _every_checkpoint_corrupt():
  directory = ENV.new_dir("ckpt_all_bad") / "checkpoints"
  it = _tiny_checkpoints(directory, [1, 2])
  _corrupt(directory / "1")
  _corrupt(directory / "2")
  ckpt = ckpt_lib.Checkpointer(str(directory), keep=5)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      return ckpt.restore_latest(_abstract(), it)
  finally:
    ckpt.close()


def _eval_workdir(*, config_text: str | None = None, checkpoints: str = "none") -> pathlib.Path:
  """A workdir as eval.py sees it: config.json (of tiny:test unless `config_text`), and checkpoints/ that
  is absent ("none"), empty ("empty") or holds step 3 of a two-array state, not of the model ("other")."""
  workdir = ENV.new_dir("eval_workdir")
  if config_text is None:
    _write_run(workdir, _config(), checkpoints=False, history=False)
  else:
    (workdir / "config.json").write_text(config_text)
  if checkpoints == "empty":
    (workdir / "checkpoints").mkdir()
  elif checkpoints == "other":
    _tiny_checkpoints(workdir / "checkpoints", [3])
  return workdir


def checkpoint_cases() -> list[Case]:
  unknown_field = json.dumps({"model": {**models.from_dict(_config().model.to_dict()).to_dict(), "foo": 1}})
  load = lambda step=None, **kw: (lambda: _loaded(restore.load_workdir(str(_eval_workdir(**kw)), step=step)))
  not_found = (FileNotFoundError, ValueError)
  return [
      Case("checkpoints", "newest training checkpoint corrupt", _newest_checkpoint_corrupt, None),
      Case("checkpoints", "every training checkpoint corrupt", _every_checkpoint_corrupt,
           says=("ckpt_all_bad/checkpoints", "restored")),
      Case("checkpoints", "eval: workdir that does not exist",
           lambda: restore.load_workdir(str(ENV.root / "no_such_workdir")), not_found,
           ("no_such_workdir", "config.json")),
      Case("checkpoints", "eval: config.json is not JSON", load(config_text="{oops"), says=("config.json",)),
      Case("checkpoints", "eval: config.json without a model section", load(config_text="[1, 2]"),
           says=("config.json", "model")),
      Case("checkpoints", "eval: config.json with an unknown model field", load(config_text=unknown_field),
           says=("foo",)),
      Case("checkpoints", "eval: no checkpoints directory", load(), not_found, ("checkpoints",)),
      Case("checkpoints", "eval: empty checkpoints directory", load(checkpoints="empty"), not_found,
           ("no checkpoints", "checkpoints")),
      Case("checkpoints", "eval: --step 7 that does not exist (have 3)", load(7, checkpoints="other"),
           not_found, ("step 7", "[3]")),
      Case("checkpoints", "eval: checkpoint 3 holds another model", load(3, checkpoints="other"),
           not_found, ("checkpoints",)),
      Case("checkpoints", "eval: --hf_dir without tokenizer.json", lambda: restore.load_hf(str(HF_FIXTURE)),
           not_found, ("tokenizer.json", "v3_tiny")),
      Case("checkpoints", "eval: run mesh (data=3) does not fit 8 devices", _eval_mesh_fallback, None),
  ]


def _loaded(result) -> str:
  """What load_workdir returned, in a few words: the step and what the first parameter is."""
  _, model, step = result
  leaf = jax.tree.leaves(nnx.state(model))[0]
  return f"returned step {step}, the first parameter a {type(leaf).__name__} of shape {leaf.shape}"


def _eval_mesh_fallback():
  config = _config({"mesh.data": 3})
  with _captured_logs() as logs:
    mesh = restore.eval_mesh(config)
  if config.batch_size % mesh.shape["data"] or not any("does not fit" in r.getMessage() for r in logs):
    raise Mishandled(f"mesh {dict(mesh.shape)}, logs {[r.getMessage() for r in logs]}")
  return f"evaluates on data={mesh.shape['data']} with a warning"
