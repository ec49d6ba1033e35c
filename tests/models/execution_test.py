"""models.Execution: validation, the model checks, the config round trip."""

from absl.testing import absltest, parameterized
import jax.numpy as jnp

import models
from models.execution import EXECUTION_FIELDS, execution_from_dict
from tests.models import tiny_configs as tc


class ExecutionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("unknown_backend", dict(moe_backend="megablocks"), r"unknown moe_backend 'megablocks'"),
      ("unknown_remat", dict(remat_policy="offload"), r"unknown remat_policy 'offload'"),
      ("unknown_attention", dict(attention_impl="flash"), r"unknown attention_impl 'flash'"),
      ("zero_capacity", dict(capacity_factor=0.0), r"capacity_factor must be a number > 0, got 0.0"),
      ("string_capacity", dict(capacity_factor="1.25"), r"capacity_factor must be a number > 0, got '1.25'"),
  )
  def test_bad_values_raise(self, fields, message):
    with self.assertRaisesRegex(ValueError, message):
      models.Execution(**fields)

  def test_cudnn_needs_low_precision_and_a_gpu(self):
    cudnn = models.Execution(attention_impl="cudnn")
    with self.assertRaisesRegex(ValueError, "bfloat16 or float16"):
      cudnn.check(tc.v3_style(dtype=jnp.float32))
    bf16 = tc.v3_style(dtype=jnp.bfloat16)
    cudnn.check(bf16)  # the platform is only checked when given
    cudnn.check(bf16, platform="gpu")
    with self.assertRaisesRegex(ValueError, "needs a GPU; these devices are 'cpu'"):
      cudnn.check(bf16, platform="cpu")

  def test_for_inference_is_dropless_without_remat(self):
    training = models.Execution(moe_backend="capacity", capacity_factor=1.0, remat_policy="full",
                                attention_impl="cudnn")
    inference = training.for_inference()
    self.assertEqual((inference.moe_backend, inference.remat_policy, inference.attention_impl),
                     ("dropless", "none", "cudnn"))

  def test_config_section_round_trip(self):
    execution = models.Execution(moe_backend="capacity", capacity_factor=2.0, remat_policy="dots")
    self.assertEqual(set(execution.to_dict()), set(EXECUTION_FIELDS))
    self.assertEqual(execution_from_dict(execution.to_dict()), execution)
    self.assertEqual(execution_from_dict({}), models.Execution())
    with self.assertRaisesRegex(ValueError, r"unknown execution fields \['moe_backnd'\]"):
      execution_from_dict({"moe_backnd": "capacity"})

  def test_hashable_and_comparable(self):
    """Execution is a static jit argument: equal settings must hash equal, so a compile is reused."""
    a, b = models.Execution(remat_policy="full"), models.Execution(remat_policy="full")
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    self.assertNotEqual(a, models.Execution())


if __name__ == "__main__":
  absltest.main()
