"""generate(): stop tokens, seeds, repetition penalty inside the compiled loop, argument checks."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import inference
from tests.inference import tiny_models

B, T, N = 2, 5, 8
PENALTY = 1.5


def _hf_repetition_penalty(ids_T, scores_V, penalty):
  """transformers' RepetitionPenaltyLogitsProcessor for one row: every id seen so far is penalised."""
  scores_V = scores_V.copy()
  seen = scores_V[ids_T]
  scores_V[ids_T] = np.where(seen < 0, seen * penalty, seen / penalty)
  return scores_V


class GenerateTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = tiny_models.v2_lite_style()
    cls.model = tiny_models.build(cls.cfg, seed=4)
    cls.ids = tiny_models.prompts(cls.cfg, B, T, seed=6)  # greedy repeats itself here
    cls.penalised = np.asarray(inference.generate(cls.model, cls.ids, N, repetition_penalty=PENALTY))

  def test_repetition_penalty_in_the_loop(self):
    """Greedy with the penalty equals recompute → transformers' penalty over prompt + generated → argmax."""
    full = jax.jit(lambda ids: self.model(ids))
    seq = np.zeros((B, T + N), np.int32)
    seq[:, :T] = self.ids
    changed = 0
    for step in range(N):
      logits = np.asarray(full(seq))[:, T + step - 1]
      for b in range(B):
        seq[b, T + step] = np.argmax(_hf_repetition_penalty(seq[b, :T + step], logits[b], PENALTY))
        changed += seq[b, T + step] != np.argmax(logits[b])
    np.testing.assert_array_equal(self.penalised, seq)
    self.assertGreater(changed, 0)  # the penalty decided some steps

  def test_stop_tokens_end_rows(self):
    gen = self.penalised[:, T:]
    # Row 0 should stop at its 3rd token, row 1 at its 6th, or earlier where a stop id occurs before.
    stops = (int(gen[0, 2]), int(gen[1, 5]))
    first = [int(np.flatnonzero(np.isin(gen[b], stops))[0]) for b in range(B)]
    self.assertNotEqual(first[0], first[1])  # one row keeps going after the other stopped
    out = inference.generate_full(self.model, self.ids, N, repetition_penalty=PENALTY, stop_tokens=stops,
                                  pad_id=-1)
    tokens = np.asarray(out.tokens)
    for b in range(B):
      np.testing.assert_array_equal(tokens[b, :T + first[b] + 1], self.penalised[b, :T + first[b] + 1])
      np.testing.assert_array_equal(tokens[b, T + first[b] + 1:], -1)  # pad after the stop token
    np.testing.assert_array_equal(out.num_generated, np.array(first) + 1)
    np.testing.assert_array_equal(out.finished, [True, True])

  def test_seed_reproduces_and_changes_samples(self):
    kw = dict(temperature=1.0, top_k=20, top_p=0.95)
    a = np.asarray(inference.generate(self.model, self.ids, N, seed=0, **kw))
    np.testing.assert_array_equal(a, inference.generate(self.model, self.ids, N, seed=0, **kw))
    np.testing.assert_array_equal(a, inference.generate(self.model, self.ids, N, seed=jax.random.key(0), **kw))
    b = np.asarray(inference.generate(self.model, self.ids, N, seed=1, **kw))
    self.assertFalse(np.array_equal(a[:, T:], b[:, T:]))
    np.testing.assert_array_equal(a[:, :T], self.ids)

  def test_bfloat16_generation_runs(self):
    """bf16 compute (and cache) through the absorbed path; XLA:CPU rejects some bf16 dot layouts."""
    cfg = tiny_models.v3_style(dtype=jnp.bfloat16)
    model = tiny_models.build(cfg)
    out = inference.generate_full(model, self.ids, 3, output_logits=True)
    self.assertEqual(out.tokens.shape, (B, T + 3))
    chex.assert_tree_all_finite(out.logits)
    self.assertTrue(np.all((np.asarray(out.tokens) >= 0) & (np.asarray(out.tokens) < cfg.vocab_size)))

  def test_argument_checks(self):
    with self.assertWarnsRegex(UserWarning, "exceeds max_position_embeddings"):
      inference.generate(self.model, self.ids, self.cfg.max_position_embeddings - T + 1)
    with self.assertRaisesRegex(ValueError, "unknown cache"):
      inference.generate(self.model, self.ids, 2, cache="paged")
    with self.assertRaisesRegex(ValueError, "prompt_lengths"):
      inference.generate(self.model, self.ids, 2, prompt_lengths=[0, 3])
    with self.assertRaisesRegex(ValueError, r"\[batch, length\]"):
      inference.generate(self.model, self.ids[0], 2)
    with self.assertRaisesRegex(ValueError, "top_p"):
      inference.generate(self.model, self.ids, 2, temperature=1.0, top_p=0.0)

  def test_rejects_empty_prompts(self):
    for shape in ((B, 0), (0, T)):
      with self.assertRaisesRegex(ValueError, rf"at least one prompt of at least one token, got shape "
                                              rf"{re.escape(str(shape))}"):
        inference.generate(self.model, np.zeros(shape, np.int32), 2)

  def test_rejects_prompt_ids_outside_the_vocab(self):
    v = self.cfg.vocab_size
    for bad in (-1, v, v + 1000):
      ids = self.ids.copy()
      ids[1, 3] = bad
      with self.assertRaisesRegex(ValueError,
                                  rf"input_ids must be token ids in \[0, {v}\).*got {bad} at \[1, 3\]"):
        inference.generate(self.model, ids, 2)
    # Only real prompt tokens count: the padding after a row's length may hold anything.
    ids = self.ids.copy()
    ids[0, 3:] = -1
    with self.assertRaisesRegex(ValueError, r"got -1 at \[0, 3\]"):
      inference.generate(self.model, ids, 2, prompt_lengths=[4, T])
    out = np.asarray(inference.generate(self.model, ids, N, repetition_penalty=PENALTY, prompt_lengths=[3, T]))
    np.testing.assert_array_equal(out[1], self.penalised[1])  # the full-length row is unchanged

  def test_rejects_bad_stop_tokens_pad_id_and_sampling_settings(self):
    v = self.cfg.vocab_size
    cases = [
        (dict(stop_tokens=(1, v)), rf"stop_tokens must be token ids in \[0, {v}\).*got {v}$"),
        (dict(stop_tokens=[-1]), r"stop_tokens must be token ids .*got -1$"),
        (dict(stop_tokens=[2.5]), r"stop_tokens must be an integer, got 2.5$"),
        (dict(pad_id=1.5), r"pad_id must be an integer, got 1.5$"),
        (dict(pad_id=2**40), rf"pad_id must fit int32, got {2**40}$"),
        (dict(temperature=-0.5), r"temperature must be >= 0, got -0.5$"),
        (dict(temperature="hot"), r"temperature must be a finite number, got 'hot'$"),
        (dict(temperature=float("inf")), r"temperature must be a finite number, got inf$"),
        (dict(top_k=-1), r"top_k must be a non-negative integer, got -1$"),
        (dict(top_k=float("inf")), r"top_k must be a finite number, got inf$"),
        (dict(temperature=1.0, top_p=1.5), r"top_p must lie in \(0, 1\], got 1.5$"),
        (dict(top_p=float("nan")), r"top_p must be a finite number, got nan$"),
        (dict(repetition_penalty=0), r"repetition_penalty must be > 0, got 0$"),
        (dict(seed=1.5), r"seed must be an integer or a jax.random.key\(...\), got 1.5$"),
        (dict(seed=jax.random.key_data(jax.random.key(0))), r"seed must be an integer or a jax.random.key"),
    ]
    for kwargs, message in cases:
      with self.subTest(**kwargs), self.assertRaisesRegex(ValueError, message):
        inference.generate(self.model, self.ids, 2, **kwargs)

  def test_values_traced_under_an_outer_jit_are_not_checked(self):
    """Traced prompts and lengths have no values to check on the host; their shapes still are."""
    run = jax.jit(lambda ids, lengths: inference.generate(self.model, ids, 2, prompt_lengths=lengths))
    chex.assert_shape(run(jnp.asarray(self.ids), jnp.asarray([3, T])), (B, T + 2))
    with self.assertRaisesRegex(ValueError, "at least one prompt"):
      jax.jit(lambda ids: inference.generate(self.model, ids, 2))(jnp.zeros((B, 0), jnp.int32))


if __name__ == "__main__":
  absltest.main()
