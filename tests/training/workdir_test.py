"""training/workdir.py: one run per workdir (lock), config.json as the contract, no silent restart."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

import models
from configs import tiny
from training import workdir as workdir_lib


def _tempdir(test) -> str:
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return tmp.name


def _config():
  return tiny.get_config("test")


def _model_cfg(config):
  return models.from_dict(config.model.to_dict())


def _write_run(path: pathlib.Path, config, *, checkpoints=True, history=True):
  """The records a run leaves: config.json as the loop writes it, a metrics line, a checkpoint dir."""
  saved = config.copy_and_resolve_references()
  with saved.unlocked():
    saved.model = _model_cfg(config).to_dict()
  (path / "config.json").write_text(saved.to_json_best_effort())
  if history:
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
  if checkpoints:
    (path / "checkpoints" / "3").mkdir(parents=True)


class LockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tempdir(self)

  def _try_lock_in_subprocess(self) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        from training import workdir
        try:
          workdir.Lock({self.dir!r}).acquire()
          print("acquired")
        except workdir.WorkdirInUseError as e:
          print("refused:", e)
    """)
    repo = pathlib.Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60)

  def test_a_second_run_is_refused_while_the_first_holds_the_lock(self):
    with workdir_lib.Lock(self.dir):
      out = self._try_lock_in_subprocess().stdout
      self.assertIn("refused:", out)
      self.assertIn(f"pid {os.getpid()} on {socket.gethostname()}", out)
    self.assertFalse(os.path.exists(os.path.join(self.dir, workdir_lib.LOCK_NAME)))  # released
    self.assertIn("acquired", self._try_lock_in_subprocess().stdout)

  def test_a_lock_left_by_a_dead_process_is_taken_over(self):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}
    pathlib.Path(self.dir, workdir_lib.LOCK_NAME).write_text(json.dumps(holder))
    with self.assertLogs(level="WARNING") as logs:
      lock = workdir_lib.Lock(self.dir)
      lock.acquire()
    self.assertIn(f"pid {holder['pid']}", "\n".join(logs.output))
    self.assertEqual(json.loads(pathlib.Path(lock.path).read_text())["pid"], os.getpid())
    lock.release()

  def test_a_lock_written_on_another_host_is_not_taken(self):
    holder = {"host": "some-other-host", "pid": 12345, "since": "earlier"}
    pathlib.Path(self.dir, workdir_lib.LOCK_NAME).write_text(json.dumps(holder))
    with self.assertRaisesRegex(workdir_lib.WorkdirInUseError, "pid 12345 on some-other-host.*delete"):
      workdir_lib.Lock(self.dir).acquire()


class ResumeContractTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(_tempdir(self))

  def test_same_model_resumes_and_execution_may_change(self):
    config = _config()
    _write_run(self.dir, config)
    config.execution.moe_backend = "dropless"
    config.total_steps = 99
    workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))

  def test_a_shape_preserving_architecture_change_is_an_error_naming_the_fields(self):
    config = _config()
    _write_run(self.dir, config)
    config.model.update(num_experts_per_tok=3, rope_theta=500000.0)
    with self.assertRaisesRegex(ValueError, r"model.num_experts_per_tok: 2 in the workdir, 3 now.*"
                                            r"model.rope_theta: 10000.0 in the workdir, 500000.0 now"):
      workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))

  def test_a_different_tokenizer_is_an_error(self):
    config = _config()
    _write_run(self.dir, config)
    config.data.update(tokenizer="sentencepiece", tokenizer_path="/x/sp.model")
    with self.assertRaisesRegex(ValueError, "data.tokenizer: 'byte' in the workdir, 'sentencepiece' now"):
      workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))

  def test_history_without_a_checkpoint_needs_start_over(self):
    config = _config()
    _write_run(self.dir, config, checkpoints=False)
    with self.assertRaisesRegex(ValueError, "has a training history .* but no checkpoint.*--start_over"):
      workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))
    workdir_lib.check_resume(str(self.dir), config, _model_cfg(config), start_over=True)
    aside = list(self.dir.glob("previous-*"))
    self.assertLen(aside, 1)
    self.assertEqual(sorted(p.name for p in aside[0].iterdir()), ["config.json", "metrics.jsonl"])
    self.assertFalse((self.dir / "metrics.jsonl").exists())
    workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))  # now a fresh workdir

  def test_start_over_also_moves_checkpoints_of_another_model_aside(self):
    config = _config()
    _write_run(self.dir, config)
    config.model.num_experts_per_tok = 3
    workdir_lib.check_resume(str(self.dir), config, _model_cfg(config), start_over=True)
    self.assertFalse((self.dir / "checkpoints").exists())
    self.assertTrue(next(self.dir.glob("previous-*")).joinpath("checkpoints", "3").is_dir())

  def test_a_fresh_or_config_only_workdir_is_fine(self):
    config = _config()
    workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))
    _write_run(self.dir, config, checkpoints=False, history=False)  # killed before its first log line
    config.model.num_experts_per_tok = 3
    workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))

  def test_unreadable_config_json_names_the_file(self):
    config = _config()
    _write_run(self.dir, config)
    (self.dir / "config.json").write_text("{not json")
    with self.assertRaisesRegex(ValueError, f"{self.dir}/config.json is not valid JSON"):
      workdir_lib.check_resume(str(self.dir), config, _model_cfg(config))


if __name__ == "__main__":
  absltest.main()
