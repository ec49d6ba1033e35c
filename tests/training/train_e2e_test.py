"""train.py end to end on one CPU device: outputs, resume after a crash, SIGTERM, a corrupt checkpoint,
a non-finite loss, and the plotting tool.

Every run is the 6-step configs/tiny.py:test run (train_testlib.CONFIG_FLAGS) in a subprocess; the
uninterrupted one (`train_testlib.reference()`) is made once per session and the others are
compared with it. Runs after the first reuse its compiled executables (persistent cache).
Interruptions come from hooks in train_driver.py: a SIGKILL right after checkpoint 3 is complete,
and a pause at step 4 during which this test sends SIGTERM.
"""

import json
import math
import pathlib
import re
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl.testing import absltest

import train_testlib as lib

TOL = 1e-5  # resumed runs must repeat the uninterrupted run's losses (same device count, same program)


def _killed_then_resumed(path: pathlib.Path):
  workdir = path / "run"
  lib.run(workdir, hook={"kill_after_save": 3}, expect_rc=-signal.SIGKILL)
  (path / "after_kill").write_text(" ".join(map(str, lib.checkpoint_steps(workdir))))
  lib.run(workdir)


def _sigterm_then_resumed(path: pathlib.Path):
  workdir = path / "run"
  ready, go = path / "ready", path / "go"
  proc, log = lib.start(workdir, hook={"pause_at_log": 4, "ready": str(ready), "go": str(go)})
  lib.wait_for(ready, proc)
  proc.send_signal(signal.SIGTERM)
  go.touch()
  rc = proc.wait(lib.TIMEOUT_S)
  (path / "sigterm_rc").write_text(str(rc))
  (path / "after_sigterm").write_text(" ".join(map(str, lib.checkpoint_steps(workdir))))
  (path / "last_step_after_sigterm").write_text(str(max(r["step"] for r in lib.metrics_rows(workdir))))
  lib.run(workdir)


def _corrupt(workdir: pathlib.Path, step: int):
  """Overwrites the array data files of checkpoint `step` (its metadata stays intact)."""
  data_files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files, f"no array data files found under checkpoints/{step}/state"
  for p in data_files:
    p.write_bytes(b"\0garbage" * 16)


def _corrupt_then_resumed(path: pathlib.Path):
  workdir = lib.copy_until(lib.reference(), path / "run", step=lib.STEPS)
  _corrupt(workdir, 6)
  lib.run(workdir)


def _all_corrupt(path: pathlib.Path):
  workdir = lib.copy_until(lib.reference(), path / "run", step=lib.STEPS)
  _corrupt(workdir, 3)
  _corrupt(workdir, 6)
  lib.run(workdir, expect_rc=1)


def _rerun_finished(path: pathlib.Path):
  lib.run(lib.copy_until(lib.reference(), path / "run", step=lib.STEPS))


def _nan_run(path: pathlib.Path):
  # lr = 1e30: the first update sends the weights to ~1e30; the next step's gradients overflow.
  lib.run(path / "run", "--config.optim.peak_lr=1e30", "--config.checkpoint_every=1", expect_rc=1)


class UninterruptedRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = lib.reference()
    cls.rows = lib.metrics_rows(cls.workdir)

  def test_the_console_shows_the_runs_own_lines(self):
    """Third-party INFO logs (Orbax's save threads, grain, absl) stay off the console by default: the
    README's first command printed 143 lines, 125 of them Orbax internals."""
    lines = (self.workdir.parent / "run.log").read_text(errors="replace").splitlines()
    self.assertEqual([l for l in lines if re.match(r"^I\d{4} ", l)], [])
    for expected in ("process 0/1, 1 devices", "initialised a fresh model in", "step 6/6  loss",
                     "step 6: eval/loss", "step 6: checkpointing to", "(the loop waited "):
      self.assertTrue(any(expected in l for l in lines), f"{expected!r} not in the console output")

  def test_metrics_file_keys(self):
    train_rows = [r for r in self.rows if "train/loss" in r]
    eval_rows = [r for r in self.rows if "eval/loss" in r]
    self.assertEqual([r["step"] for r in train_rows], list(range(1, 7)))
    self.assertEqual([r["step"] for r in eval_rows], [3, 6])
    # How long each (asynchronous) save held up the step loop: one row per checkpoint.
    saves = [r for r in self.rows if "checkpoint/blocked_s" in r]
    self.assertEqual([r["step"] for r in saves], [3, 6])
    self.assertTrue(all(0 <= r["checkpoint/blocked_s"] < 60 for r in saves), saves)
    for row in train_rows:
      for key in ("train/loss", "train/ce", "train/mtp_ce", "train/lr", "train/grad_norm", "perf/tokens_per_sec",
                  "moe/moe_layers/layer0/load_max", "moe/moe_layers/layer1/routing_entropy", "moe/mtp/load_min"):
        self.assertIn(key, row)
        self.assertTrue(math.isfinite(row[key]), f"{key} = {row[key]} at step {row['step']}")
      self.assertGreater(row["perf/tokens_per_sec"], 0)
      self.assertGreaterEqual(row["moe/mtp/load_max"], 1.0)
    for row in eval_rows:
      for key in ("eval/loss", "eval/bits_per_byte", "eval/perplexity"):
        self.assertIn(key, row)
      # Byte tokens: bits per byte is the loss in bits.
      np.testing.assert_allclose(row["eval/bits_per_byte"], row["eval/loss"] / math.log(2), rtol=1e-6)

  def test_learning_rate_follows_the_schedule(self):
    peak, floor = 3e-3, 3e-4  # lib.CONFIG_FLAGS: peak 3e-3, min_lr_ratio 0.1, cosine over steps 4..6
    cos = lambda p: floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    lrs = lib.logged(self.workdir, "train/lr")
    np.testing.assert_allclose([lrs[s] for s in range(1, 7)], [peak, peak, peak, peak, cos(1 / 3), cos(2 / 3)],
                               rtol=1e-6)

  def test_loss_decreases(self):
    loss = lib.logged(self.workdir)
    self.assertLess(loss[6], loss[1] - 0.5, loss)
    self.assertLess(loss[3], loss[1], loss)
    evals = lib.logged(self.workdir, "eval/loss")
    self.assertLess(evals[6], evals[3])

  def test_tensorboard_events_and_checkpoints(self):
    events = list((self.workdir / "tensorboard").glob("events.out.tfevents.*"))
    self.assertLen(events, 1)
    data = events[0].read_bytes()
    for tag in (b"train/loss", b"eval/bits_per_byte", b"perf/tokens_per_sec"):
      self.assertIn(tag, data)
    self.assertEqual(lib.checkpoint_steps(self.workdir), [3, 6])
    for step in (3, 6):
      self.assertTrue((self.workdir / "checkpoints" / str(step) / "state").is_dir())
      self.assertTrue((self.workdir / "checkpoints" / str(step) / "data").is_dir())
    self.assertTrue((self.workdir / "final_metrics.json").exists())

  def test_plot_metrics(self):
    from tools import plot_metrics
    out = self.workdir.parent / "plots"
    out.mkdir(exist_ok=True)
    written = plot_metrics.plot(str(self.workdir), str(out))
    self.assertEqual(sorted(pathlib.Path(p).name for p in written), ["expert_load.png", "loss.png"])
    for name in ("loss.png", "expert_load.png"):
      data = (out / name).read_bytes()
      self.assertTrue(data.startswith(b"\x89PNG"), name)
      self.assertGreater(len(data), 5000, name)


class ResumeTest(absltest.TestCase):

  def test_resume_after_sigkill_repeats_the_uninterrupted_losses(self):
    path = lib.once("killed", _killed_then_resumed)
    self.assertEqual((path / "after_kill").read_text(), "3")
    workdir = path / "run"
    log = (path / "run.log").read_text(errors="replace")
    self.assertIn("HOOK: SIGKILL after checkpoint 3", log)
    self.assertIn("resumed from the checkpoint at step 3", log)
    resumed, reference = lib.logged(workdir), lib.logged(lib.reference())
    self.assertEqual(sorted(resumed), list(range(1, 7)))
    diff = lib.max_abs_diff(resumed, reference, range(1, 7))
    lib.record("resume_after_sigkill_max_abs_loss_diff_steps_1_6", diff)
    self.assertLessEqual(diff, TOL)
    # The killed run stopped after logging step 3, so each step is logged once.
    self.assertEqual([r["step"] for r in lib.metrics_rows(workdir) if "train/loss" in r], list(range(1, 7)))
    self.assertEqual(lib.checkpoint_steps(workdir), [3, 6])

  def test_sigterm_checkpoints_and_exits_cleanly(self):
    path = lib.once("sigterm", _sigterm_then_resumed)
    log = (path / "run.log").read_text(errors="replace")
    self.assertEqual((path / "sigterm_rc").read_text(), "0", log[-3000:])
    self.assertIn("received signal 15: checkpointed step 4 and stopping", log)
    self.assertEqual((path / "after_sigterm").read_text(), "3 4")  # 4 only because of the signal
    self.assertEqual((path / "last_step_after_sigterm").read_text(), "4")
    # And the rerun continues from the step-4 checkpoint like the uninterrupted run.
    self.assertIn("resumed from the checkpoint at step 4", log)
    resumed, reference = lib.logged(path / "run"), lib.logged(lib.reference())
    diff = lib.max_abs_diff(resumed, reference, range(1, 7))
    lib.record("resume_after_sigterm_max_abs_loss_diff_steps_1_6", diff)
    self.assertLessEqual(diff, TOL)

  def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(self):
    path = lib.once("corrupt", _corrupt_then_resumed)
    log = (path / "run.log").read_text(errors="replace")
    self.assertIn("checkpoint 6 is unreadable", log)
    self.assertIn("falling back to the previous one", log)
    self.assertIn("resumed from the checkpoint at step 3", log)
    workdir = path / "run"
    resumed, reference = lib.logged(workdir), lib.logged(lib.reference())
    diff = lib.max_abs_diff(resumed, reference, range(4, 7))
    lib.record("resume_after_corrupt_checkpoint_max_abs_loss_diff_steps_4_6", diff)
    self.assertLessEqual(diff, TOL)
    # The unreadable checkpoint was set aside (not deleted) and step 6 saved afresh.
    self.assertEqual(lib.checkpoint_steps(workdir), [3, 6])
    self.assertLen(list((workdir / "checkpoints").glob("6.unreadable-*")), 1)
    # The failed restore's abandoned reads must not flood the output with tracebacks.
    self.assertNotIn("Event loop is closed", log)

  def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(self):
    path = lib.once("all_corrupt", _all_corrupt)
    log = (path / "run.log").read_text(errors="replace")
    self.assertIn("ValueError", log)
    self.assertIn("none of the checkpoints [6, 3] in", log)
    self.assertNotIn("Event loop is closed", log)  # the real error is not buried (see checkpoint.py)
    self.assertNotIn("initialised a fresh model", log)
    self.assertEqual(lib.checkpoint_steps(path / "run"), [3, 6])  # nothing moved or deleted
    self.assertEqual(lib.metrics_rows(path / "run"), lib.metrics_rows(lib.reference()))

  def test_rerunning_a_finished_run_changes_nothing(self):
    path = lib.once("rerun_finished", _rerun_finished)
    self.assertIn("resumed from the checkpoint at step 6", (path / "run.log").read_text(errors="replace"))
    workdir, reference = path / "run", lib.reference()
    self.assertEqual(lib.metrics_rows(workdir), lib.metrics_rows(reference))
    self.assertEqual(lib.checkpoint_steps(workdir), [3, 6])
    final = json.loads((workdir / "final_metrics.json").read_text())
    self.assertEqual(final, json.loads((reference / "final_metrics.json").read_text()))
    self.assertIn("train/loss", final)


class NonFiniteLossTest(absltest.TestCase):

  def test_stops_naming_the_last_good_checkpoint(self):
    path = lib.once("nan", _nan_run)
    workdir = path / "run"
    log = (path / "run.log").read_text(errors="replace")
    self.assertIn("NonFiniteLossError", log)
    match = re.search(r"train/loss became (\S+) \(grad norm (\S+)\) at step (\d+); stopping\. "
                      r"The last good checkpoint is step (\d+) in (\S+)\.", log)
    self.assertIsNotNone(match, log[-3000:])
    loss, grad_norm, bad_step, good_step = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    self.assertFalse(math.isfinite(float(loss)) and math.isfinite(float(grad_norm)))
    self.assertEqual(good_step, bad_step - 1)
    self.assertEqual(match.group(5), str(workdir / "checkpoints"))
    # Nothing after the last good step was saved, and what was saved is finite.
    self.assertEqual(lib.checkpoint_steps(workdir)[-1], good_step)
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(good_step) / "state")
    for path_, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
      self.assertTrue(np.all(np.isfinite(np.asarray(leaf))), jax.tree_util.keystr(path_))


if __name__ == "__main__":
  absltest.main()
