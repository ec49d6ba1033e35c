"""Parity with Hugging Face transformers on committed golden fixtures (float32, max |Δ| ≤ 1e-4).

The fixtures (tests/fixtures/hf/, made by tools/make_hf_fixtures.py) are tiny DeepseekV3/V2
checkpoints with decisive routing, non-trivial norm weights and router biases, sequences longer than
YaRN's original length, and the logits transformers computed for them.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import models
from models import safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
TOL = 1e-4


def _reference(name):
  return safetensors_io.read(os.path.join(FIXTURES, f"{name}.reference.safetensors"))


class HFParityTest(parameterized.TestCase):

  @parameterized.parameters("v3_tiny", "v3_fp8", "v2_lite_tiny", "v2_tiny")
  def test_logits_match_transformers(self, name):
    ref = _reference(name)
    model = models.load_hf_checkpoint(os.path.join(FIXTURES, name), dtype=jnp.float32)
    logits = jax.jit(lambda ids: model(ids))(ref["input_ids"])
    chex.assert_shape(logits, ref["logits"].shape)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=TOL, rtol=0)
    # A prefix alone gives the same logits as inside the longer sequence (and as transformers).
    t = ref["logits_prefix"].shape[1]
    np.testing.assert_allclose(np.asarray(model(ref["input_ids"][:, :t])), ref["logits_prefix"], atol=TOL, rtol=0)

  @parameterized.parameters("v3_tiny", "v3_fp8")
  def test_mtp_logits_match_transformers(self, name):
    ref = _reference(name)
    model = models.load_hf_checkpoint(os.path.join(FIXTURES, name), dtype=jnp.float32)
    mtp = model.mtp_logits(ref["input_ids"])
    chex.assert_shape(mtp, ref["mtp_logits"].shape)
    np.testing.assert_allclose(np.asarray(mtp), ref["mtp_logits"], atol=TOL, rtol=0)

  @parameterized.parameters("v3_tiny", "v2_lite_tiny", "v2_tiny")
  def test_fixture_is_discriminating(self, name):
    """The reference logits are far from trivial, so a wrong model cannot pass by accident."""
    ref = _reference(name)
    self.assertGreater(float(np.std(ref["logits"])), 100 * TOL)
    self.assertGreater(ref["input_ids"].shape[1], 16)  # beyond YaRN's original length in the fixtures

  def test_both_backends_match_transformers(self):
    ref = _reference("v3_tiny")
    model = models.load_hf_checkpoint(os.path.join(FIXTURES, "v3_tiny"), dtype=jnp.float32)
    capacity = models.Execution(moe_backend="capacity", capacity_factor=64.0)  # ample: nothing dropped
    logits = model.forward(jnp.asarray(ref["input_ids"]), execution=capacity).logits
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=TOL, rtol=0)


if __name__ == "__main__":
  absltest.main()
