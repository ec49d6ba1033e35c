"""Greedy generation from the HF fixture checkpoints reproduces transformers' `generate` exactly.

Fixtures: tests/fixtures/hf/<name>.generate.safetensors, made by tools/make_hf_generate_fixtures.py
(transformers 5.23, float32, eager, cached greedy decoding, 12 new tokens after 10-token prompts,
every step decided by a top1-top2 logit margin > 1e-3). They also hold transformers' own repetition
penalty / top-k / top-p outputs on the last step's logits.
"""

import os

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import inference
import models
from inference import sampling
from models import safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
TOL = 1e-4


def _fixture(name):
  return safetensors_io.read(os.path.join(FIXTURES, f"{name}.generate.safetensors"))


class HFGenerateTest(parameterized.TestCase):

  @parameterized.parameters("v3_tiny", "v2_lite_tiny", "v2_tiny")
  def test_greedy_generate_matches_transformers(self, name):
    ref = _fixture(name)
    self.assertGreater(ref["margins"].min(), 1e-3)
    model = models.load_hf_checkpoint(os.path.join(FIXTURES, name), dtype=jnp.float32)
    prompt, expected = ref["prompt_ids"], ref["generated_ids"]
    new = expected.shape[1] - prompt.shape[1]
    out = inference.generate_full(model, prompt, new, temperature=0.0, output_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_allclose(np.asarray(out.logits), ref["step_logits"], atol=TOL, rtol=0)

  @parameterized.parameters("v3_tiny", "v2_lite_tiny", "v2_tiny")
  def test_logit_processors_match_transformers(self, name):
    ref = _fixture(name)
    penalty, top_k, top_p = ref["settings"].tolist()
    ids, logits = ref["generated_ids"], jnp.asarray(ref["step_logits"][:, -1])
    present = sampling.token_presence(jnp.asarray(ids), logits.shape[-1])
    np.testing.assert_allclose(sampling.apply_repetition_penalty(logits, present, penalty),
                               ref["penalty_scores"], rtol=1e-6)
    for mask, key in ((sampling.top_k_mask(logits, int(top_k)), "top_k_scores"),
                      (sampling.top_p_mask(logits, top_p), "top_p_scores")):
      np.testing.assert_array_equal(np.asarray(mask), np.isfinite(ref[key]), err_msg=key)


if __name__ == "__main__":
  absltest.main()
