"""GRPO end to end: train.py --config=configs/r1_zero_tiny.py:grpo from the session's tiny pretraining run
(full and LoRA), its metrics every step, resume after a kill on the same trajectory, and the checks that
run before anything compiles.

The reward is tests/training/grpo_test_rewards.py's digit fraction (named by dotted path, as a user's own
reward would be), so an untrained model's groups differ and every step learns something.
"""

import json
import os
import pathlib
import signal
import subprocess
import tempfile

import numpy as np
from absl.testing import absltest

import train_testlib as lib
from configs import r1_zero_tiny
from training import grpo_trainer
from training import rollout
from training.validate import validate_run

GRPO_FLAGS = (
    "--config=configs/r1_zero_tiny.py:grpo",
    "--config.total_steps=4",
    "--config.seq_len=32",
    "--config.checkpoint_every=2",
    "--config.eval_every=2",
    "--config.log_every=1",
    "--config.grpo.prompts_per_step=4",
    "--config.grpo.group_size=4",
    "--config.grpo.max_new_tokens=6",
    "--config.grpo.eval_prompts=8",
    "--config.grpo.kl_beta=0.04",
    "--config.grpo.rewards=grpo_test_rewards.digit_fraction:1.0",
    "--config.optim.peak_lr=1e-2",
    "--config.execution.moe_backend=dropless",
)
STEP_METRICS = ("train/loss", "train/grad_norm", "grpo/reward_mean", "grpo/reward_std",
                "grpo/reward/grpo_test_rewards.digit_fraction", "grpo/kl", "grpo/clip_fraction",
                "grpo/completion_length", "grpo/entropy", "grpo/zero_std_groups", "perf/rollout_s", "perf/update_s")


def _train(workdir, *flags, hook: dict | None = None, expect_rc: int = 0) -> pathlib.Path:
  env = lib.env()
  env["PYTHONPATH"] += os.pathsep + str(pathlib.Path(__file__).parent)  # the test reward's module
  if hook:
    env["TRAIN_TEST_HOOK"] = json.dumps(hook)
  entry = str(lib.DRIVER if hook else lib.REPO / "train.py")
  command = [lib.PYTHON, entry, *GRPO_FLAGS, f"--config.init_from={lib.reference()}",
             f"--config.data.data_dir={lib.data_dir()}", f"--workdir={workdir}", *flags]
  log = pathlib.Path(f"{workdir}.log")
  with open(log, "ab") as f:
    rc = subprocess.run(command, cwd=lib.REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                        timeout=lib.TIMEOUT_S).returncode
  if rc != expect_rc:
    raise AssertionError(f"train.py exited {rc}, expected {expect_rc}; {log}:\n{lib.log_tail(log)}")
  return pathlib.Path(workdir)


def _uninterrupted(path):
  _train(path / "run")


def _killed_then_resumed(path):
  _train(path / "run", hook={"kill_after_save": 2}, expect_rc=-signal.SIGKILL)
  _train(path / "run")


def _lora(path):
  _train(path / "run", "--config.lora.rank=4", "--config.total_steps=2")


class GrpoRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.rundir = lib.once("grpo_run", _uninterrupted) / "run"

  def test_every_step_logs_the_rl_metrics(self):
    rows = [r for r in lib.metrics_rows(self.rundir) if "grpo/reward_mean" in r]
    self.assertEqual([r["step"] for r in rows], [1, 2, 3, 4])
    for row in rows:
      for key in STEP_METRICS:
        self.assertIn(key, row)
        self.assertTrue(np.isfinite(row[key]), (key, row[key]))
      self.assertGreater(row["grpo/reward_std"], 0.0)  # the digit reward varies within the groups
      self.assertLess(row["grpo/zero_std_groups"], 1.0)
      self.assertGreater(row["train/grad_norm"], 0.0)
    self.assertEqual(rows[0]["grpo/kl"], 0.0)  # step 1 samples from the reference policy itself
    self.assertGreater(rows[-1]["grpo/kl"], 0.0)  # later steps have moved away from it
    self.assertEqual(rows[0]["grpo/clip_fraction"], 0.0)  # μ = 1: the ratio is exactly 1
    evals = [r for r in lib.metrics_rows(self.rundir) if "eval/reward_mean" in r]
    self.assertEqual([r["step"] for r in evals], [2, 4])
    self.assertEqual(lib.checkpoint_steps(self.rundir), [2, 4])
    log = pathlib.Path(f"{self.rundir}.log").read_text()
    self.assertIn("step 4/4  reward", log)

  def test_resume_continues_the_same_trajectory(self):
    resumed = lib.once("grpo_resumed", _killed_then_resumed) / "run"
    self.assertIn("resumed from the checkpoint at step 2", pathlib.Path(f"{resumed}.log").read_text())
    for key in ("grpo/reward_mean", "train/loss", "grpo/kl", "grpo/completion_length"):
      ours, reference = lib.logged(resumed, key), lib.logged(self.rundir, key)
      self.assertEqual(sorted(ours), [1, 2, 3, 4], key)
      self.assertLessEqual(lib.max_abs_diff(ours, reference, [3, 4]), 1e-5, key)

  def test_lora_grpo_trains_the_adapters_only(self):
    run = lib.once("grpo_lora", _lora) / "run"
    rows = lib.metrics_rows(run)
    counts = next(r for r in rows if "params/total" in r)
    self.assertLess(counts["params/trainable"], 0.2 * counts["params/total"])
    self.assertEqual([r["step"] for r in rows if "grpo/reward_mean" in r], [1, 2])


class GrpoBadInputTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    scratch = tempfile.TemporaryDirectory()
    self.addCleanup(scratch.cleanup)
    self.workdir = os.path.join(scratch.name, "run")

  def _config(self, **grpo):
    config = r1_zero_tiny.get_config("grpo")
    config.update(init_from=str(lib.reference()), seq_len=32)
    config.data.data_dir = str(lib.data_dir())
    config.grpo.update(**grpo)
    return config

  def assert_invalid(self, config, *fragments):
    with self.assertRaises(ValueError) as cm:
      validate_run(config, self.workdir)
    for fragment in fragments:
      self.assertIn(fragment, str(cm.exception))

  def test_a_good_config_validates(self):
    validate_run(self._config(), self.workdir)

  def test_unknown_reward(self):
    self.assert_invalid(self._config(rewards="arithmetic_exact:1.0,no_such_reward:0.5"), "grpo.rewards",
                        "no_such_reward", "arithmetic_exact")

  def test_group_of_one(self):
    self.assert_invalid(self._config(group_size=1), "grpo.group_size = 1", "an integer >= 2")

  def test_grpo_needs_init_from(self):
    config = self._config()
    config.init_from = ""
    self.assert_invalid(config, "objective = 'grpo' improves a trained model: set init_from")

  def test_rollouts_must_split_over_the_batch_shards(self):
    config = self._config(prompts_per_step=3, group_size=2)
    problems = grpo_trainer.config_problems(config, batch_shards=4)
    self.assertEqual(len(problems), 1)
    self.assertIn("prompts_per_step * grpo.group_size = 6 rollouts do not split over the 4 batch shards", problems[0])
    self.assertEqual(grpo_trainer.config_problems(config, batch_shards=3), [])


class RolloutLayoutTest(absltest.TestCase):

  def test_step_indices_walk_seeded_permutations(self):
    n, per_step = 10, 4
    stream = np.concatenate([rollout.step_indices(s, per_step, n, seed=3) for s in range(5)])
    self.assertCountEqual(stream[:10], range(10))  # epoch 1: every prompt once
    self.assertCountEqual(stream[10:20], range(10))  # epoch 2: every prompt once, in another order
    self.assertFalse(np.array_equal(stream[:10], stream[10:20]))
    np.testing.assert_array_equal(rollout.step_indices(3, per_step, n, seed=3), stream[12:16])  # stateless
    self.assertFalse(np.array_equal(rollout.step_indices(0, per_step, n, seed=4), stream[:4]))

  def test_update_batch_marks_the_completion_tokens(self):
    tokens = np.array([[5, 6, 7, 8, 9, 0], [5, 6, 7, 0, 0, 0]], np.int32)
    out = rollout.Rollout(indices=np.array([0, 1]), tokens=tokens, prompt_lengths=np.array([2, 2], np.int32),
                          num_generated=np.array([3, 1], np.int32), finished=np.array([True, False]),
                          completions=["", ""])
    batch = rollout.update_batch(out)
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"][1], np.arange(6))


if __name__ == "__main__":
  absltest.main()
