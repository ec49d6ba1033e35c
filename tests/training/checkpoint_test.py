"""training/checkpoint.py: a failed save (disk full, ...) is one clear error, not pages of tracebacks.

A real full disk needs a small filesystem (seen with a 300 KiB tmpfs: 443 lines of Orbax tracebacks
before, 15 after); here the manager is replaced by one whose background save fails the same way.
"""

import logging as py_logging
import sys

from absl.testing import absltest

from training import checkpoint as ckpt_lib


class _FailingManager:
  """Orbax's CheckpointManager as a full disk leaves it: save returns, the wait raises."""

  def __init__(self, latest):
    self.latest, self.saves = latest, []

  def save(self, step, args, force):
    self.saves.append(step)
    return True

  def wait_until_finished(self):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file '
                     '"/x/checkpoints/7.orbax-checkpoint-tmp/state": No space left on device\nmore lines')

  def reload(self):
    pass

  def latest_step(self):
    return self.latest

  def close(self):
    pass


def _checkpointer(latest):
  checkpointer = ckpt_lib.Checkpointer.__new__(ckpt_lib.Checkpointer)
  checkpointer.directory, checkpointer._pending, checkpointer.manager = "/x/checkpoints", None, _FailingManager(latest)
  return checkpointer


class SaveFailureTest(absltest.TestCase):

  def test_a_failed_background_save_is_one_error_naming_step_cause_and_what_is_left(self):
    checkpointer = _checkpointer(latest=5)
    checkpointer._pending = 7  # as `save(7, ...)` leaves it: the write runs in the background
    with self.assertRaises(ckpt_lib.CheckpointSaveError) as ctx:
      checkpointer.close()
    message = str(ctx.exception)
    self.assertEqual(message.splitlines(), [message])  # one line
    self.assertIn("saving checkpoint 7 to /x/checkpoints failed (disk full?): RESOURCE_EXHAUSTED", message)
    self.assertIn("The newest complete checkpoint is step 5.", message)
    self.assertIsNone(ctx.exception.__cause__)
    self.assertTrue(ctx.exception.__suppress_context__)  # no chained Orbax traceback

  def test_orbax_tracebacks_are_dropped_and_their_messages_kept(self):
    ckpt_lib._quiet_orbax_tracebacks()
    ckpt_lib._quiet_orbax_tracebacks()  # idempotent
    logger = py_logging.getLogger("absl")
    self.assertLen([f for f in logger.filters if isinstance(f, ckpt_lib._OrbaxTracebacks)], 1)
    try:
      raise ValueError("RESOURCE_EXHAUSTED")
    except ValueError:
      exc_info = sys.exc_info()
    orbax = py_logging.LogRecord("absl", py_logging.ERROR, "/site-packages/orbax/checkpoint/x.py", 1,
                                 "save failed", None, exc_info)
    ours = py_logging.LogRecord("absl", py_logging.ERROR, "/repo/training/loop.py", 1, "ours", None, exc_info)
    self.assertTrue(all(f.filter(orbax) for f in logger.filters))
    self.assertIsNone(orbax.exc_info)
    self.assertEqual(orbax.getMessage(), "save failed")
    self.assertTrue(all(f.filter(ours) for f in logger.filters))
    self.assertIsNotNone(ours.exc_info)  # only Orbax's own records lose their traceback


if __name__ == "__main__":
  absltest.main()
