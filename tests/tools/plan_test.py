"""`python -m tools.plan` on configs/tiny.py in a subprocess: its counts, memory lines, the training
loss of --forward, and the errors for plans that cannot run."""

import math
import re
import subprocess
import sys

from absl.testing import absltest

import models
from configs import tiny
from models import counting
from session_scratch import REPO, subprocess_env

MTP_LAMBDA = 0.1  # not the config's 0.3, so a tool that ignores the run config shows


def plan(*flags: str, config: str = "configs/tiny.py") -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "tools.plan", f"--config={config}", *flags], cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)


def fields(stdout: str) -> dict[str, str]:
  """`name: value` lines of the report."""
  return dict(m.groups() for m in re.finditer(r"^(\w+): (.*)$", stdout, re.MULTILINE))


def as_b_or_m(n: int) -> str:
  return f"{n / 1e6:.2f}M"  # how the tool prints counts below 0.1B (tiny's)


class ReportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    result = plan()
    assert result.returncode == 0, result.stderr[-4000:]
    cls.fields = fields(result.stdout)

  def test_counts_match_counting(self):
    config = tiny.get_config()
    cfg = models.from_dict(config.model.to_dict())
    counts = counting.count_params(cfg)
    self.assertEqual(self.fields["total_params"], as_b_or_m(counts.total))
    self.assertEqual(self.fields["activated_params"], as_b_or_m(counts.activated))
    self.assertEqual(self.fields["kv_cache_values_per_token_per_layer"].split()[:4], ["48", "latent", "vs", "320"])

  def test_memory_lines(self):
    for part in ("params", "grads", "optimizer", "activations", "total"):
      value = re.fullmatch(r"([0-9.]+) GiB", self.fields[f"memory_per_device_{part}"])
      self.assertIsNotNone(value, part)
      self.assertGreater(float(value.group(1)), 0.0, part)


class ForwardTest(absltest.TestCase):

  def test_forward_reports_the_training_loss(self):
    # The test variant of tiny compiles its forward+backward in seconds (the full tiny one took ~1 min);
    # init std 0.02 as tiny's own, so the premise below holds.
    result = plan("--forward", f"--config.loss.mtp_lambda={MTP_LAMBDA}", "--config.model.init_std=0.02",
                  config="configs/tiny.py:test")
    self.assertEqual(result.returncode, 0, result.stderr[-4000:])
    line = fields(result.stdout)["forward_backward"]
    m = re.match(r"loss ([-0-9.]+) = ce ([-0-9.]+) \+ ([0-9.e-]+) x mtp_ce ([-0-9.]+) "
                 r"\+ ([0-9.e-]+) x balance ([-0-9.]+)", line)
    self.assertIsNotNone(m, line)
    loss, ce, mtp_lambda, mtp_ce, alpha, balance = map(float, m.groups())
    self.assertTrue(math.isfinite(loss))
    self.assertEqual((mtp_lambda, alpha), (MTP_LAMBDA, 1e-4))  # the run config's weights
    # A fresh model (init std 0.02) is nearly uniform over the 256 bytes: both heads' cross-entropy
    # is ln 256 = 5.545 plus a few hundredths.
    self.assertBetween(ce, math.log(256), math.log(256) + 0.1)
    self.assertBetween(mtp_ce, math.log(256), math.log(256) + 0.1)
    self.assertAlmostEqual(loss, ce + mtp_lambda * mtp_ce + alpha * balance, delta=2e-4)  # printed to 4 places


class ErrorsTest(absltest.TestCase):

  def test_an_indivisible_mesh_fails_clearly(self):
    run = plan("--devices=7", "--config.mesh.tensor=2")
    self.assertNotEqual(run.returncode, 0)
    self.assertIn("cannot infer mesh axis 'data': the other axes multiply to 2, which does not divide the 7 "
                  "devices", run.stderr)

  def test_a_batch_that_does_not_split_over_the_mesh_fails_clearly(self):
    run = plan("--devices=7")
    self.assertNotEqual(run.returncode, 0)
    self.assertIn("global batch size 16 is not divisible", run.stderr)

  def test_a_plan_over_the_memory_limit_fails_clearly(self):
    run = plan("--device_memory_gb=0.1")  # the plan needs ~0.16 GiB
    self.assertNotEqual(run.returncode, 0)
    self.assertRegex(run.stderr, r"ValueError: this plan needs ~0\.2 GiB per device .* a device has 0\.1 GiB")


if __name__ == "__main__":
  absltest.main()
