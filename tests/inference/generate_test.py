"""generate(): stop tokens, seeds, repetition penalty inside the compiled loop, argument checks."""

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


if __name__ == "__main__":
  absltest.main()
