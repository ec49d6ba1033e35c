"""Distillation (objective = distill): the sequence mode's teacher data written once and reused, a dense
student trained on it, logits mode's KL term, and a teacher with another tokenizer refused up front.

The teacher is the session's 6-step tiny:test pretraining run (train_testlib.reference()); the student is
a two-layer dense model of the same vocabulary.
"""

import json
import os
import pathlib
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import train_testlib as lib
from configs import r1_zero_tiny
from evaluation import restore
from training import distill
from training import step as step_lib
from training.validate import validate_run

HF_FIXTURE = lib.REPO / "tests" / "fixtures" / "hf" / "v2_lite_tiny"  # BOS 1, EOS 2: not the byte tokenizer's
STUDENT_FLAGS = (
    "--config=configs/r1_zero_tiny.py:distill",
    "--config.total_steps=2",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.checkpoint_every=2",
    "--config.eval_every=2",
    "--config.log_every=1",
    "--config.model.hidden_size=32",
    "--config.model.num_layers=2",
    "--config.model.first_k_dense=2",
    "--config.model.num_heads=2",
    "--config.model.q_lora_rank=16",
    "--config.model.kv_lora_rank=16",
    "--config.model.qk_nope_head_dim=8",
    "--config.model.qk_rope_head_dim=8",
    "--config.model.v_head_dim=8",
    "--config.model.dense_intermediate_size=64",
    "--config.model.max_position_embeddings=64",
    "--config.distill.num_prompts=64",
    "--config.distill.teacher_temperature=1.0",  # the 6-step teacher's greedy answer is mostly EOS
    "--config.distill.max_new_tokens=4",
)


def _train(workdir, *flags) -> pathlib.Path:
  command = [lib.PYTHON, str(lib.REPO / "train.py"), *STUDENT_FLAGS, f"--config.distill.teacher={lib.reference()}",
             f"--config.data.data_dir={lib.data_dir()}", f"--workdir={workdir}", *flags]
  log = pathlib.Path(f"{workdir}.log")
  with open(log, "ab") as f:
    rc = subprocess.run(command, cwd=lib.REPO, env=lib.env(), stdout=f, stderr=subprocess.STDOUT,
                        timeout=lib.TIMEOUT_S).returncode
  if rc != 0:
    raise AssertionError(f"train.py exited {rc}; {log}:\n{lib.log_tail(log)}")
  return pathlib.Path(workdir)


def _sequence(path):
  _train(path / "run")
  data = distill.data_path(str(path / "run"))
  (path / "first_write").write_text(f"{os.stat(data).st_mtime_ns} {pathlib.Path(data).read_text()}")
  _train(path / "run", "--config.total_steps=4")  # resumes: the teacher's lines must be reused


def _logits(path):
  _train(path / "run", "--config.distill.mode=logits", "--config.data.dataset=arithmetic", "--config.eval_batches=2")


class SequenceDistillTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.path = lib.once("distill_sequence", _sequence)
    cls.rundir = cls.path / "run"

  def test_the_teacher_completes_each_prompt_once(self):
    lines = [json.loads(l) for l in pathlib.Path(distill.data_path(str(self.rundir))).read_text().splitlines()]
    self.assertBetween(len(lines), 32, 64)
    for line in lines:
      self.assertRegex(line["prompt"], r"^\d+[-+*]\d+=$")
      self.assertTrue(line["completion"].strip())
      self.assertIn("answer", line)
    mtime, text = (self.path / "first_write").read_text().split(" ", 1)
    data = distill.data_path(str(self.rundir))
    self.assertEqual(int(mtime), os.stat(data).st_mtime_ns)  # the resumed run did not write it again
    self.assertEqual(text, pathlib.Path(data).read_text())
    log = pathlib.Path(f"{self.rundir}.log").read_text()
    self.assertEqual(log.count("distill: the teacher completed"), 1)
    self.assertIn("resumed from the checkpoint at step 2", log)

  def test_the_student_is_dense_and_trains_on_completions_only(self):
    rows = lib.metrics_rows(self.rundir)
    self.assertEqual(sorted(r["step"] for r in rows if "train/loss" in r), [1, 2, 3, 4])
    tokens = [r["train/tokens"] for r in rows if "train/tokens" in r]
    # Answers only: a line has >= 4 prompt bytes ("1+2=") and <= 5 completion tokens (4 + EOS), so at most
    # 5/9 of a row's 32 tokens are targets; unmasked, nearly all 8 x 32 would be.
    self.assertTrue(all(0 < t <= 5 / 9 * 8 * 32 for t in tokens), tokens)
    self.assertTrue(any("eval/loss" in r for r in rows))
    _, student, _ = restore.load_workdir(str(self.rundir))
    self.assertIsNone(student.moe_layers)
    _, teacher, _ = restore.load_workdir(str(lib.reference()))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx_params(m)))
    self.assertLess(count(student), count(teacher))


def nnx_params(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.state(model, nnx.Param)


class LogitsDistillTest(absltest.TestCase):

  def test_logits_mode_trains_on_the_kl(self):
    run = lib.once("distill_logits", _logits) / "run"
    rows = [r for r in lib.metrics_rows(run) if "distill/kl" in r]
    self.assertEqual([r["step"] for r in rows], [1, 2])
    for r in rows:
      self.assertTrue(np.isfinite(r["distill/kl"]) and r["distill/kl"] > 0)
      self.assertTrue(np.isfinite(r["train/loss"]))
    self.assertFalse(os.path.exists(distill.data_path(str(run))))

  def test_kl_sum_matches_numpy(self):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 7)).astype(np.float32), rng.normal(size=(2, 5, 7)).astype(np.float32)
    mask = rng.random((2, 5)) > 0.3
    tau = 2.0
    log_softmax = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    ps, pt = log_softmax(s.astype(np.float64) / tau), log_softmax(t.astype(np.float64) / tau)
    expected = (np.exp(pt) * (pt - ps)).sum(-1)[mask].sum()
    got = step_lib.distill_kl_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), tau)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    self.assertAlmostEqual(float(step_lib.distill_kl_sum(jnp.asarray(s), jnp.asarray(s), jnp.asarray(mask), tau)), 0.0,
                           places=5)


class DistillBadInputTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    scratch = tempfile.TemporaryDirectory()
    self.addCleanup(scratch.cleanup)
    self.workdir = os.path.join(scratch.name, "run")

  def _config(self, teacher):
    config = r1_zero_tiny.get_config("distill")
    config.distill.teacher = str(teacher)
    config.data.data_dir = str(lib.data_dir())
    return config

  def test_a_teacher_with_another_tokenizer(self):
    with self.assertRaises(ValueError) as cm:
      validate_run(self._config(HF_FIXTURE), self.workdir)
    self.assertIn("distill.teacher: the run's tokenizer has BOS id None", str(cm.exception))

  def test_a_missing_teacher(self):
    with self.assertRaises(ValueError) as cm:
      validate_run(self._config(""), self.workdir)
    self.assertIn("objective = 'distill' needs distill.teacher", str(cm.exception))
    with self.assertRaises(ValueError) as cm:
      validate_run(self._config(os.path.join(self.workdir, "nowhere")), self.workdir)
    self.assertIn("distill.teacher", str(cm.exception))

  def test_the_same_tokenizer_validates(self):
    validate_run(self._config(lib.reference()), self.workdir)


if __name__ == "__main__":
  absltest.main()
