"""Sampling: greedy at temperature 0, exact top-k / top-p supports, transformers' repetition penalty,
seeded reproducibility. Supports are checked empirically: many draws on fixed logits."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from inference import sampling
from inference.sampling import SamplingConfig

DRAWS = 4000


def _support(logits_V, cfg, seed=0):
  """Set of token ids drawn in DRAWS independent samples, and their frequencies."""
  logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (DRAWS, len(logits_V)))
  # Eager on purpose: op-by-op kernels are shared by every setting, where jit would compile each one.
  draws = np.asarray(sampling.sample(jax.random.key(seed), logits_BV, cfg))
  return set(draws.tolist()), np.bincount(draws, minlength=len(logits_V)) / DRAWS


def _hf_repetition_penalty(input_ids_BT, scores_BV, penalty):
  """transformers' RepetitionPenaltyLogitsProcessor, written out: gather, penalise, scatter."""
  scores = np.array(scores_BV, np.float32)
  for b in range(scores.shape[0]):
    score = scores[b, input_ids_BT[b]]
    scores[b, input_ids_BT[b]] = np.where(score < 0, score * penalty, score / penalty)
  return scores


class SamplingTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_temperature_zero_is_greedy(self):
    logits = jax.random.normal(jax.random.key(0), (8, 50))
    for cfg in (SamplingConfig(), SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)):
      sample = self.variant(sampling.sample, static_argnames="cfg")
      for seed in (0, 1):
        tokens = sample(jax.random.key(seed), logits, cfg=cfg)
        chex.assert_type(tokens, jnp.int32)
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))

  def test_top_k_support_is_exactly_the_k_most_likely(self):
    logits = np.random.default_rng(1).normal(size=24).astype(np.float32)
    for k in (1, 5):
      support, freq = _support(logits, SamplingConfig(temperature=1.0, top_k=k))
      self.assertEqual(support, set(np.argsort(-logits)[:k].tolist()))
      kept = np.argsort(-logits)[:k]
      expected = np.exp(logits[kept]) / np.exp(logits[kept]).sum()
      np.testing.assert_allclose(freq[kept], expected, atol=0.03)
    support, _ = _support(logits, SamplingConfig(temperature=1.0))
    self.assertEqual(len(support), 24)  # unfiltered sampling reaches every token here

  def test_top_p_support_is_exactly_the_nucleus(self):
    probs = np.array([0.30, 0.22, 0.17, 0.12, 0.08, 0.05, 0.03, 0.02, 0.01])
    order = np.array([4, 0, 7, 2, 8, 1, 5, 3, 6])  # token ids of the probabilities above
    logits = np.zeros(9, np.float32)
    logits[order] = np.log(probs)
    # Mass above each ranked token: 0, .30, .52, .69, .81, .89, .94, ...: p=0.75 keeps the top 4 (mass .81).
    cases = {0.75: {4, 0, 7, 2}, 0.5: {4, 0}, 0.2: {4}, 0.9: {4, 0, 7, 2, 8, 1}, 0.95: {4, 0, 7, 2, 8, 1, 5}}
    for p, nucleus in cases.items():
      support, _ = _support(logits, SamplingConfig(temperature=1.0, top_p=p))
      self.assertEqual(support, nucleus, f"top_p={p}")
      mask = np.asarray(sampling.top_p_mask(jnp.asarray(logits)[None], p))[0]
      self.assertEqual(set(np.flatnonzero(mask).tolist()), nucleus)
    # top-k first, then the nucleus of the renormalised top 3 (.30, .22, .17)/.69 = (.435, .319, .246):
    # masses above are 0, .435, .754, so p=0.7 keeps 2 and p=0.8 all 3.
    for p, nucleus in ((0.7, {4, 0}), (0.8, {4, 0, 7})):
      support, _ = _support(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=p))
      self.assertEqual(support, nucleus, f"top_k=3, top_p={p}")
    # Temperature 2 flattens the distribution first: the 0.75 nucleus grows to 5 tokens.
    flat = np.sqrt(probs) / np.sqrt(probs).sum()
    self.assertEqual(int(np.searchsorted(np.cumsum(flat) - flat, 0.75)), 5)
    support, _ = _support(logits, SamplingConfig(temperature=2.0, top_p=0.75))
    self.assertEqual(support, {4, 0, 7, 2, 8})

  @parameterized.parameters(1.3, 0.7)
  def test_repetition_penalty_matches_transformers_semantics(self, penalty):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(3, 30)).astype(np.float32)
    scores[:, 7] = 0.0
    ids = np.array([[1, 7, 7, 29, 3, 1], [0, 0, 0, 0, 0, 0], [5, 12, 12, 8, 2, 20]])
    present = sampling.token_presence(jnp.asarray(ids), 30)
    ours = sampling.apply_repetition_penalty(jnp.asarray(scores), present, penalty)
    np.testing.assert_allclose(ours, _hf_repetition_penalty(ids, scores, penalty), rtol=1e-6)
    # Padding (valid=False) does not count as seen.
    valid = np.arange(6)[None] < np.array([[6], [6], [3]])
    present = np.asarray(sampling.token_presence(jnp.asarray(ids), 30, jnp.asarray(valid)))
    self.assertEqual(set(np.flatnonzero(present[2]).tolist()), {5, 12})
    # Applied before temperature: greedy follows the penalised logits.
    cfg = SamplingConfig(repetition_penalty=penalty)
    np.testing.assert_array_equal(
        sampling.sample(jax.random.key(0), jnp.asarray(scores), cfg, sampling.token_presence(jnp.asarray(ids), 30)),
        np.argmax(_hf_repetition_penalty(ids, scores, penalty), axis=-1))

  def test_seed_reproduces_and_changes_samples(self):
    logits = jnp.zeros((64, 40))
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    a = sampling.sample(jax.random.key(7), logits, cfg)
    np.testing.assert_array_equal(a, sampling.sample(jax.random.key(7), logits, cfg))
    self.assertFalse(np.array_equal(a, sampling.sample(jax.random.key(8), logits, cfg)))

  def test_temperature_scales_logits(self):
    logits = jax.random.normal(jax.random.key(3), (2, 10))
    np.testing.assert_allclose(sampling.process_logits(logits, SamplingConfig(temperature=0.5)), logits / 0.5,
                               rtol=1e-6)

  def test_invalid_settings_raise(self):
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5),
                dict(repetition_penalty=0.0)):
      with self.assertRaises(ValueError, msg=str(bad)):
        SamplingConfig(**bad)
    with self.assertRaisesRegex(ValueError, "tokens seen so far"):
      sampling.process_logits(jnp.zeros((1, 4)), SamplingConfig(repetition_penalty=1.2))

  def test_non_numbers_and_non_finite_settings_name_the_setting(self):
    for name, bad in (("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.5"),
                      ("temperature", None), ("top_k", float("inf")), ("top_k", float("nan")),
                      ("top_p", float("nan")), ("repetition_penalty", float("inf"))):
      with self.subTest(name=name, bad=bad), self.assertRaisesRegex(
          ValueError, rf"^{name} must be a finite number, got {re.escape(repr(bad))}$"):
        SamplingConfig(**{name: bad})

  def test_settings_become_plain_python_numbers(self):
    """numpy / jax scalars are stored as float / int, so the config stays a hashable static jit argument."""
    cfg = SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(3), top_p=jnp.float32(0.5),
                         repetition_penalty=2)
    self.assertEqual(cfg, SamplingConfig(0.5, 3, 0.5, 2.0))
    self.assertEqual(hash(cfg), hash(SamplingConfig(0.5, 3, 0.5, 2.0)))
    self.assertEqual([type(v) for v in dataclasses.astuple(cfg)], [float, int, float, float])


if __name__ == "__main__":
  absltest.main()
