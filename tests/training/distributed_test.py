"""Two train.py processes under jax.distributed (localhost coordinator, one CPU device each, mesh data=-1)
build the dataset (first use), train 2 steps together, checkpoint, and log the 1-device run's losses.
Nothing CPU-specific is needed: gloo is jax's default CPU collectives implementation.

With total_steps=2 the schedule gives steps 1 and 2 the same learning rate (the peak) as the 6-step
reference run, so their losses must agree with its first two.
"""

import pathlib
import socket
import subprocess

from absl.testing import absltest

import train_testlib as lib

RTOL = 1e-4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(path: pathlib.Path):
  workdir = path / "run"
  port = _free_port()
  # A data dir not built yet: both processes would build it at once unless the loop lets one do it.
  fresh_data = f"--config.data.data_dir={path / 'tfds'}"
  procs = [lib.start(workdir, "--config.total_steps=2", fresh_data, f"--coordinator_address=localhost:{port}",
                     "--num_processes=2", f"--process_id={i}", devices=1, log_name=f"process{i}")[0]
           for i in range(2)]
  try:
    rcs = [p.wait(lib.TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
    raise
  (path / "returncodes").write_text(" ".join(map(str, rcs)))


class TwoProcessTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.path = lib.once("distributed", _two_processes)
    cls.workdir = cls.path / "run"
    cls.logs = [(cls.path / f"process{i}.log").read_text(errors="replace") for i in range(2)]

  def test_both_processes_exit_cleanly(self):
    self.assertEqual((self.path / "returncodes").read_text(), "0 0",
                     "\n\n".join(log[-2000:] for log in self.logs))
    for i, log in enumerate(self.logs):
      self.assertIn(f"process {i}/2, 2 devices", log)

  def test_the_dataset_was_built_once(self):
    self.assertLen(list((self.path / "tfds" / "python_stdlib" / "lib").glob("1.0.0")), 1)
    self.assertEqual(list((self.path / "tfds" / "python_stdlib" / "lib").glob("incomplete*")), [])

  def test_checkpoint_written(self):
    self.assertEqual(lib.checkpoint_steps(self.workdir), [2])
    data = self.workdir / "checkpoints" / "2" / "data"
    # Each process saves its own input-pipeline position (it reads its own rows of the batch).
    self.assertEqual(sorted(p.name for p in data.glob("process_*.json")), ["process_0-of-2.json", "process_1-of-2.json"])

  def test_losses_match_the_single_process_run(self):
    losses, reference = lib.logged(self.workdir), lib.logged(lib.reference())
    self.assertEqual(sorted(losses), [1, 2])
    lrs, ref_lrs = lib.logged(self.workdir, "train/lr"), lib.logged(lib.reference(), "train/lr")
    self.assertEqual([lrs[1], lrs[2]], [ref_lrs[1], ref_lrs[2]])
    diff = lib.max_rel_diff(losses, reference, [1, 2])
    lib.record("two_processes_max_rel_loss_diff_steps_1_2", diff)
    self.assertLessEqual(diff, RTOL, (losses, reference))
    # Only process 0 writes metrics: each step is logged once.
    self.assertEqual([r["step"] for r in lib.metrics_rows(self.workdir) if "train/loss" in r], [1, 2])


if __name__ == "__main__":
  absltest.main()
