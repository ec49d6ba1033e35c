"""training/loss.py: the hand-written NLL gradient and the unsliced shifted targets, against the plain
formulas autodiff differentiates (float32, tight tolerances), on random logits (never zeros)."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from training import loss as loss_lib

B, T, V = 3, 11, 37


def _reference_nll(logits_BTV, targets_BT):
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0.0, 3.0, (B, T, V)), dtype)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  weights = jnp.asarray(rng.uniform(-1.0, 1.0, (B, T)), jnp.float32)  # an arbitrary cotangent
  return logits, targets, weights


class TokenNllTest(absltest.TestCase):

  def test_value_and_gradient_match_autodiff_float32(self):
    logits, targets, weights = _inputs()
    np.testing.assert_allclose(loss_lib.token_nll(logits, targets), _reference_nll(logits, targets),
                               rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(weights * loss_lib.token_nll(x, targets)))(logits)
    ref = jax.grad(lambda x: jnp.sum(weights * _reference_nll(x, targets)))(logits)
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-7)
    self.assertGreater(float(jnp.max(jnp.abs(ref))), 0.1)

  def test_bfloat16_logits_give_a_bfloat16_gradient_equal_to_the_float32_one_rounded(self):
    logits, targets, weights = _inputs(1, jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(weights * loss_lib.token_nll(x, targets)))(logits)
    self.assertEqual(grad.dtype, jnp.bfloat16)
    ref = jax.grad(lambda x: jnp.sum(weights * _reference_nll(x, targets)))(logits.astype(jnp.float32))
    np.testing.assert_allclose(grad.astype(jnp.float32), ref, rtol=1e-2, atol=1e-3)  # one bf16 rounding

  def test_one_pass_logsumexp(self):
    logits, targets, weights = _inputs(5)
    logits = logits.at[0, 0, 3].set(80.0).at[1, 2].set(-40.0)  # a dominant logit; a flat row
    np.testing.assert_allclose(loss_lib.logsumexp_one_pass(logits), jax.nn.logsumexp(logits, axis=-1),
                               rtol=1e-6, atol=1e-6)
    self.assertEqual(float(loss_lib.logsumexp_one_pass(jnp.full((1, 4), -jnp.inf))[0]), -np.inf)
    fn = lambda x: jnp.sum(weights * loss_lib.token_nll(x, targets))
    two_pass = jax.value_and_grad(fn)(logits)
    with mock.patch.object(loss_lib, "ONE_PASS_LOGSUMEXP", True):
      one_pass = jax.value_and_grad(fn)(logits)
    chex.assert_trees_all_close(one_pass, two_pass, rtol=1e-6, atol=1e-6)

  def test_jit_and_vmap(self):
    logits, targets, weights = _inputs(2)
    np.testing.assert_allclose(jax.jit(loss_lib.token_nll)(logits, targets),
                               jax.vmap(loss_lib.token_nll)(logits, targets), rtol=1e-6)
    row_loss = lambda x, t, w: jnp.sum(w * loss_lib.token_nll(x, t))  # [T, V] logits per row
    grad = jax.vmap(jax.grad(row_loss))(logits, targets, weights)
    ref = jax.grad(lambda x: jnp.sum(weights * _reference_nll(x, targets)))(logits)
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-7)


class LossTermsTest(absltest.TestCase):

  def _batch(self):
    segments = np.array([[1] * 6 + [2] * 3 + [0] * 2] * B, np.int32)
    tokens = np.random.default_rng(3).integers(0, V, (B, T)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}

  def test_sums_and_logit_gradients_equal_the_sliced_formula(self):
    batch = self._batch()
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(0.0, 2.0, (B, T, V)), jnp.float32)
    mtp_logits = jnp.asarray(rng.normal(0.0, 2.0, (B, T - 1, V)), jnp.float32)

    def ours(logits, mtp_logits):
      out = models.ModelOutput(logits, None, {}, mtp_logits, {"balance_loss": jnp.zeros(())})
      terms = loss_lib.loss_terms(out, batch)
      return terms["ce_sum"] + 0.3 * terms["mtp_sum"], terms

    def sliced(logits, mtp_logits):
      tokens = batch["tokens"]
      mask = loss_lib.target_mask(batch["segment_ids"], 1)
      mtp_mask = loss_lib.target_mask(batch["segment_ids"], 2)
      ce = jnp.sum(jnp.where(mask, _reference_nll(logits[:, :-1], tokens[:, 1:]), 0.0))
      mtp = jnp.sum(jnp.where(mtp_mask, _reference_nll(mtp_logits[:, :-1], tokens[:, 2:]), 0.0))
      return ce + 0.3 * mtp, (jnp.sum(mask), jnp.sum(mtp_mask))

    (value, terms), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(logits, mtp_logits)
    (ref_value, (count, mtp_count)), ref_grads = jax.value_and_grad(sliced, argnums=(0, 1), has_aux=True)(
        logits, mtp_logits)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    self.assertEqual(float(terms["ce_count"]), float(count))
    self.assertEqual(float(terms["mtp_count"]), float(mtp_count))
    for grad, ref in zip(grads, ref_grads):
      np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-7)
    # The last position of each head predicts past the row: no loss there, no gradient.
    self.assertEqual(float(jnp.max(jnp.abs(grads[0][:, -1]))), 0.0)
    self.assertEqual(float(jnp.max(jnp.abs(grads[1][:, -1]))), 0.0)

  def test_shifted_targets_and_mask(self):
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) + 1
    np.testing.assert_array_equal(loss_lib.shifted_targets(tokens, 2, 5),
                                  [[3, 4, 5, 6, 0], [9, 10, 11, 12, 0]])
    mask = jnp.ones((2, 4), bool)
    np.testing.assert_array_equal(loss_lib.shifted_mask(mask, 5), [[1, 1, 1, 1, 0]] * 2)


if __name__ == "__main__":
  absltest.main()
