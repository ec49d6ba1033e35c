"""training/grpo.py: group advantages, the GRPO loss in its three aggregations and the policy metrics,
each against an independent float64 NumPy transcription of the formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from training import grpo

B, T = 6, 9


# --- float64 NumPy references -------------------------------------------------------------------------------


def _np_group_advantages(rewards, group_size, scale):
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + 1e-6)  # np.std is the population std (ddof=0)
  return adv.reshape(-1)


def _np_per_token(new, old, ref, adv, eps, eps_high, beta):
  """Per-token loss [B, T], ratio and k3, written token by token from the paper's formulas."""
  loss, ratio, kl = (np.zeros(new.shape) for _ in range(3))
  for b in range(new.shape[0]):
    for t in range(new.shape[1]):
      ratio[b, t] = np.exp(new[b, t] - old[b, t])
      clipped = min(max(ratio[b, t], 1 - eps), 1 + eps_high)
      surrogate = min(ratio[b, t] * adv[b], clipped * adv[b])
      kl[b, t] = np.exp(ref[b, t] - new[b, t]) - (ref[b, t] - new[b, t]) - 1
      loss[b, t] = -(surrogate - beta * kl[b, t])
  return loss, ratio, kl


def _np_loss(new, old, ref, adv, mask, eps, eps_high, beta, aggregation):
  new, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (new, old, ref, adv, mask))
  loss, _, _ = _np_per_token(new, old, ref, adv, eps, eps_high, beta)
  if aggregation == "sequence_mean":
    rows = [(mask[b] * loss[b]).sum() / max(mask[b].sum(), 1.0) for b in range(new.shape[0])]
    return np.mean(rows)
  if aggregation == "token_mean":
    return (mask * loss).sum() / max(mask.sum(), 1.0)
  return (mask * loss).sum() / mask.size


def _np_metrics(new, old, ref, adv, mask, eps, eps_high):
  new, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (new, old, ref, adv, mask))
  _, ratio, kl = _np_per_token(new, old, ref, adv, eps, eps_high, 0.0)
  sel = mask > 0
  adv_bt = np.broadcast_to(adv[:, None], new.shape)
  clipped = ((adv_bt > 0) & (ratio > 1 + eps_high)) | ((adv_bt < 0) & (ratio < 1 - eps))
  return {"clip_fraction": clipped[sel].mean(), "kl": kl[sel].mean(), "ratio_mean": ratio[sel].mean()}


# --- inputs --------------------------------------------------------------------------------------------------


def _inputs(seed: int, spread: float, zero_row: bool = True, garbage: float | None = None):
  """float32 [B, T] log-probs with logp_new - logp_old ~ U(-spread, spread), advantages [B] and a random
  mask (row 2 all zero when `zero_row`); with `garbage`, masked-out positions hold +-garbage instead."""
  rng = np.random.default_rng(seed)
  new = rng.uniform(-3.0, -0.1, (B, T))
  old = new + rng.uniform(-spread, spread, (B, T))
  ref = new + rng.uniform(-0.5, 0.5, (B, T))
  adv = rng.normal(size=B)
  mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float32)
  mask[:, 0] = 1.0  # every row but the zero row has at least one token
  if zero_row:
    mask[2] = 0.0
  if garbage is not None:
    sign = np.where(rng.uniform(size=(B, T)) < 0.5, -1.0, 1.0)
    new = np.where(mask > 0, new, garbage * sign)
    old = np.where(mask > 0, old, -garbage * sign)
    ref = np.where(mask > 0, ref, garbage)
  return tuple(np.asarray(x, np.float32) for x in (new, old, ref, adv, mask))


class GroupAdvantagesTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_matches_numpy(self, scale):
    rewards = np.random.default_rng(0).normal(size=12).astype(np.float32)
    for group_size in (2, 3, 4, 12):
      got = grpo.group_advantages(rewards, group_size, scale=scale)
      self.assertEqual(got.dtype, jnp.float32)
      self.assertEqual(got.shape, (12,))
      np.testing.assert_allclose(got, _np_group_advantages(rewards, group_size, scale), rtol=1e-4, atol=1e-6)

  @parameterized.parameters(True, False)
  def test_equal_rewards_give_exactly_zero(self, scale):
    # 0.1 is not exact in binary: the float32 mean of three 0.1s is not 0.1, so a naive (r - mean) / (std + 1e-6)
    # would give the first group advantages of about -0.0075 instead of 0.
    rewards = np.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.2, 0.7, 0.7, 0.7], np.float32)
    self.assertNotEqual(float(rewards[0] - jnp.mean(jnp.asarray(rewards[:3]))), 0.0)
    got = np.asarray(jax.jit(grpo.group_advantages, static_argnums=(1, 2))(rewards, 3, scale))
    np.testing.assert_array_equal(got[:3], 0.0)
    np.testing.assert_array_equal(got[6:], 0.0)
    self.assertTrue(np.all(got[3:6] != 0.0))

  @parameterized.parameters((10, 3), (6, 4), (6, 1), (6, 0))
  def test_bad_group_size_raises(self, batch, group_size):
    with self.assertRaises(ValueError):
      grpo.group_advantages(np.zeros(batch, np.float32), group_size)


class GrpoLossTest(parameterized.TestCase):

  @parameterized.product(
      aggregation=grpo.AGGREGATIONS,
      clipping=[False, True],
      kl_beta=[0.0, 0.04],
  )
  def test_matches_numpy(self, aggregation, clipping, kl_beta):
    # Without clipping: ratios within exp(+-0.05) of 1 and a huge epsilon. With it: ratios up to exp(+-0.5)
    # against DAPO's asymmetric (0.2, 0.28), so both the low and the high bound bind somewhere.
    spread, eps, eps_high = (0.5, 0.2, 0.28) if clipping else (0.05, 10.0, None)
    new, old, ref, adv, mask = _inputs(seed=1, spread=spread)
    ratio = np.exp(new.astype(np.float64) - old)
    if clipping:
      self.assertTrue(np.any(ratio[mask > 0] > 1 + eps_high) and np.any(ratio[mask > 0] < 1 - eps))
    loss_fn = jax.jit(functools.partial(grpo.grpo_loss, clip_epsilon=eps, clip_epsilon_high=eps_high,
                                        kl_beta=kl_beta, aggregation=aggregation))
    got = loss_fn(new, old, ref if kl_beta else None, adv, mask)
    self.assertEqual(got.shape, ())
    self.assertEqual(got.dtype, jnp.float32)
    want = _np_loss(new, old, ref, adv, mask, eps, eps if eps_high is None else eps_high, kl_beta, aggregation)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

  def test_kl_beta_zero_ignores_logp_ref(self):
    new, old, ref, adv, mask = _inputs(seed=2, spread=0.5)
    kw = dict(clip_epsilon=0.2, kl_beta=0.0)
    np.testing.assert_array_equal(grpo.grpo_loss(new, old, None, adv, mask, **kw),
                                  grpo.grpo_loss(new, old, np.full_like(ref, np.nan), adv, mask, **kw))

  def test_on_policy_loss_and_gradient(self):
    # mu = 1: logp_old is logp_new itself (no gradient), so every ratio is exactly 1 and nothing clips;
    # the loss is -mean(A) and d loss / d logp_new = -A_b * mask / sum(mask_b) / B.
    new, _, _, adv, mask = _inputs(seed=3, spread=0.5, zero_row=False)

    def loss_fn(logp_new):
      return grpo.grpo_loss(logp_new, jax.lax.stop_gradient(logp_new), None, adv, mask,
                            clip_epsilon=0.2, kl_beta=0.0, aggregation="sequence_mean")

    metrics = grpo.policy_metrics(new, new, None, adv, mask, clip_epsilon=0.2)
    self.assertEqual(float(metrics["ratio_mean"]), 1.0)
    self.assertEqual(float(metrics["clip_fraction"]), 0.0)
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(new)
    np.testing.assert_allclose(loss, -np.mean(adv.astype(np.float64)), rtol=1e-5, atol=1e-6)
    m = mask.astype(np.float64)
    want = -adv.astype(np.float64)[:, None] * m / m.sum(axis=1, keepdims=True) / B
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)

  @parameterized.product(aggregation=grpo.AGGREGATIONS, garbage=[None, 50.0, np.inf])
  def test_masked_tokens_carry_no_gradient(self, aggregation, garbage):
    new, old, ref, adv, mask = _inputs(seed=4, spread=0.5, garbage=garbage)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(
        grpo.grpo_loss, clip_epsilon=0.2, clip_epsilon_high=0.28, kl_beta=0.04, aggregation=aggregation)))
    loss, grad = grad_fn(new, old, ref, adv, mask)
    self.assertTrue(np.isfinite(loss))
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
    self.assertTrue(np.any(np.asarray(grad)[mask > 0] != 0.0))
    # The garbage changes nothing: the loss equals the one with benign values at the masked positions.
    clean = _inputs(seed=4, spread=0.5)
    np.testing.assert_allclose(loss, grad_fn(*clean)[0], rtol=1e-6)

  @parameterized.parameters("mean", "sum", "")
  def test_bad_aggregation_raises(self, aggregation):
    new, old, ref, adv, mask = _inputs(seed=5, spread=0.1)
    with self.assertRaisesRegex(ValueError, "sequence_mean.*token_mean.*dr_grpo"):
      grpo.grpo_loss(new, old, ref, adv, mask, clip_epsilon=0.2, kl_beta=0.0, aggregation=aggregation)

  @parameterized.parameters((0.0, None), (-0.1, None), (0.2, 0.0), (0.2, -0.3))
  def test_bad_epsilon_raises(self, eps, eps_high):
    new, old, ref, adv, mask = _inputs(seed=5, spread=0.1)
    with self.assertRaises(ValueError):
      grpo.grpo_loss(new, old, ref, adv, mask, clip_epsilon=eps, clip_epsilon_high=eps_high, kl_beta=0.0)
    with self.assertRaises(ValueError):
      grpo.policy_metrics(new, old, ref, adv, mask, clip_epsilon=eps, clip_epsilon_high=eps_high)

  def test_kl_without_reference_raises(self):
    new, old, _, adv, mask = _inputs(seed=5, spread=0.1)
    with self.assertRaises(ValueError):
      grpo.grpo_loss(new, old, None, adv, mask, clip_epsilon=0.2, kl_beta=0.04)


class PolicyMetricsTest(parameterized.TestCase):

  @parameterized.parameters((0.2, 0.28), (0.2, None), (10.0, None))
  def test_matches_numpy(self, eps, eps_high):
    new, old, ref, adv, mask = _inputs(seed=6, spread=0.5, garbage=50.0)
    fn = jax.jit(functools.partial(grpo.policy_metrics, clip_epsilon=eps, clip_epsilon_high=eps_high))
    got = fn(new, old, ref, adv, mask)
    want = _np_metrics(new, old, ref, adv, mask, eps, eps if eps_high is None else eps_high)
    self.assertEqual(set(got), {"clip_fraction", "kl", "ratio_mean"})
    for name, value in got.items():
      self.assertEqual(value.shape, ())
      self.assertEqual(value.dtype, jnp.float32)
      np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    if eps < 1:
      self.assertGreater(float(got["clip_fraction"]), 0.0)
    else:
      self.assertEqual(float(got["clip_fraction"]), 0.0)

  def test_no_reference_gives_zero_kl(self):
    new, old, _, adv, mask = _inputs(seed=7, spread=0.5)
    got = grpo.policy_metrics(new, old, None, adv, mask, clip_epsilon=0.2)
    self.assertEqual(float(got["kl"]), 0.0)


if __name__ == "__main__":
  absltest.main()
