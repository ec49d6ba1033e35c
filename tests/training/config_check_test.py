"""training/config_check.py: every bad run field at once, unknown overrides with suggestions, and the
entry points rejecting bad flags before any work."""

import subprocess
import sys

from absl.testing import absltest
import ml_collections

import train_testlib as lib
from configs import tiny
from training import config_check


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, script, *flags], cwd=lib.REPO, env=lib.env(), capture_output=True,
                        text=True, timeout=120)


class RunConfigProblemsTest(absltest.TestCase):

  def test_the_default_configs_are_clean(self):
    self.assertEqual(config_check.run_config_problems(tiny.get_config()), [])
    self.assertEqual(config_check.run_config_problems(tiny.get_config("test")), [])

  def test_documented_values_pass(self):
    config = tiny.get_config("test")
    config.data.dataset = "python_stdlib/full"
    config.seed = 7
    self.assertEqual(config_check.run_config_problems(config), [])
    d = config.to_dict()
    d["seed"] = 1.5  # a config built from a mapping (the locked ConfigDict would refuse the float)
    self.assertEqual(config_check.run_config_problems(ml_collections.ConfigDict(d)),
                     ["seed = 1.5: must be an integer >= 0"])

  def test_every_problem_is_listed_naming_the_field(self):
    config = tiny.get_config("test")
    config.keep_checkpoints = 0
    config.eval_batches = -1
    config.optim.peak_lr = -3e-4
    config.optim.b2 = 1.0
    config.loss.mtp_lambda = float("nan")
    config.data.dataset = "c4"
    config.execution.remat_policy = "offload"
    problems = config_check.run_config_problems(config)
    self.assertEqual(problems, [
        "eval_batches = -1: must be an integer >= 0 (0: the whole validation split)",
        "keep_checkpoints = 0: must be an integer >= 1 (0 would delete every checkpoint)",
        "optim.peak_lr = -0.0003: must be a number > 0",
        "optim.b2 = 1.0: must be a number in [0, 1)",
        "loss.mtp_lambda = nan: must be a number >= 0",
        "data.dataset = 'c4': must be python_stdlib, python_stdlib/lib, python_stdlib/full, text_files, sft_jsonl, arithmetic or arithmetic/<d2|d3|decimal>",
        "execution: unknown remat_policy 'offload'; expected one of ('none', 'full', 'dots')",
    ])


class UnknownOverridesTest(absltest.TestCase):

  def test_suggestions(self):
    config = tiny.get_config()
    argv = ["--config.optim.peak_lrr=1", "--config.total_steps=3", "--config.modle.hidden_size", "64",
            "--workdir=/tmp/x", "--config.mesh.data.x=1"]
    self.assertEqual(config_check.unknown_overrides(argv, "config", config), [
        "--config.optim.peak_lrr: config.optim has no field 'peak_lrr'; did you mean 'peak_lr'?",
        "--config.modle.hidden_size: config has no field 'modle'; did you mean 'model'?",
        "--config.mesh.data.x: config.mesh.data has no field 'x'; config.mesh.data is not a section",
    ])


class EntryPointsTest(absltest.TestCase):

  def test_train_rejects_unknown_fields_in_one_message(self):
    run = _run("train.py", "--config=configs/tiny.py:test", "--workdir=/nonexistent/never/created",
               "--config.foo=1", "--config.optim.peak_lrr=2")
    self.assertEqual(run.returncode, 1, run.stderr[-2000:])
    self.assertIn("FATAL Flags parsing error: unknown config fields:", run.stderr)
    self.assertIn("--config.optim.peak_lrr: config.optim has no field 'peak_lrr'; did you mean 'peak_lr'?",
                  run.stderr)
    self.assertIn("--config.foo: config has no field 'foo'", run.stderr)
    self.assertNotIn("Traceback", run.stderr)

  def test_eval_rejects_unknown_tasks_before_loading_anything(self):
    # The workdir does not exist: had eval.py looked at it first, the error would be about it.
    run = _run("eval.py", "--workdir=/nonexistent/workdir", "--tasks=arithmetic,unknown")
    self.assertNotEqual(run.returncode, 0)
    self.assertEqual(run.stderr.strip(), "eval.py: unknown --tasks ['unknown']; known: ['arithmetic', 'exact_match']")


if __name__ == "__main__":
  absltest.main()
