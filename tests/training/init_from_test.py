"""config.init_from, objectives and LoRA settings are checked before anything is built: each mistake is
a clear error naming the field (training/validate.py, training/weights.py)."""

import os
import tempfile

import jax.numpy as jnp
from absl.testing import absltest

import models
import train_testlib as lib
from configs import tiny, tiny_sft
from training import weights
from training.validate import validate_run
from training import workdir as workdir_lib

HF_FIXTURE = str(lib.REPO / "tests" / "fixtures" / "hf" / "v2_lite_tiny")


class InitFromTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = str(lib.reference())  # the 6-step tiny:test run, checkpoints 3 and 6

  def setUp(self):
    super().setUp()
    scratch = tempfile.TemporaryDirectory()
    self.addCleanup(scratch.cleanup)
    self.sft_file = os.path.join(scratch.name, "train.jsonl")
    with open(self.sft_file, "w") as f:
      f.write('{"prompt": "ab=", "completion": "ba"}\n' * 4)
    self.workdir = os.path.join(scratch.name, "run")
    os.makedirs(self.workdir)

  def _sft(self, **fields):
    config = tiny_sft.get_config()
    config.data.sft_files = self.sft_file
    config.update(init_from=self.base, seq_len=32, batch_size=8)
    for key, value in fields.items():
      section, _, name = key.rpartition(".")
      (config[section] if section else config)[name] = value
    return config

  def assert_invalid(self, config, *fragments):
    with self.assertRaises(ValueError) as cm:
      validate_run(config, self.workdir)
    for fragment in fragments:
      self.assertIn(fragment, str(cm.exception))

  def test_the_architecture_comes_from_the_source(self):
    model_cfg, _, _ = validate_run(self._sft(), self.workdir)
    source = models.from_dict(workdir_lib.read_run_config(self.base).model.to_dict())
    self.assertEqual(model_cfg, source)

  def test_dtypes_may_differ(self):
    model_cfg, _, _ = validate_run(self._sft(**{"model.dtype": "bfloat16"}), self.workdir)
    self.assertEqual(model_cfg.dtype, jnp.bfloat16)
    self.assertEqual(model_cfg.param_dtype, jnp.float32)

  def test_a_model_field_that_disagrees_is_named(self):
    config = tiny.get_config("test")
    config.update(init_from=self.base)
    validate_run(config, self.workdir)  # the same fields as the source: fine
    config.model.hidden_size = 48
    self.assert_invalid(config, "model.hidden_size = 48", "has 32", "only dtype and param_dtype may differ")

  def test_tokenizer_must_match(self):
    config = self._sft(init_from=HF_FIXTURE)  # byte tokenizer: no BOS, EOS 0 ≠ the fixture's 1 and 2
    self.assert_invalid(config, "init_from: the run's tokenizer has BOS id None, but", "config.json has bos_token_id 1",
                        "has EOS id 0, but")

  def test_bad_sources(self):
    self.assert_invalid(self._sft(init_from="/nonexistent/run"), "is not a directory")
    self.assert_invalid(self._sft(init_from=f"{self.base}@three"), "must be a checkpoint step")
    self.assert_invalid(self._sft(init_from=f"{self.base}@5"), "has no checkpoint 5 (it has [3, 6])")
    self.assert_invalid(self._sft(init_from=self.workdir), "has no config.json")
    self.assertEqual(weights.parse_source(f"{self.base}@3"), weights.Source("workdir", self.base, 3))
    self.assertEqual(weights.parse_source(HF_FIXTURE).kind, "hf")

  def test_objective_and_lora_settings(self):
    self.assert_invalid(self._sft(**{"data.dataset": "python_stdlib"}), "objective = 'sft'", "sft_jsonl")
    self.assert_invalid(self._sft(objective="rlhf"), "objective = 'rlhf': must be pretrain or sft")
    self.assert_invalid(self._sft(**{"lora.rank": 4, "lora.targets": "no_such_weight"}), "lora:",
                        "no_such_weight")
    self.assert_invalid(self._sft(**{"lora.rank": 4, "lora.dropout": 1.0}), "lora:", "dropout")
    self.assert_invalid(self._sft(**{"lora.rank": -1}), "lora.rank = -1")
    config = tiny.get_config("test")
    config.lora.rank = 4
    self.assert_invalid(config, "lora.rank > 0 needs init_from")


if __name__ == "__main__":
  absltest.main()
