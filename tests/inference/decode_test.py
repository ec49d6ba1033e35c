"""Cached decoding equals recomputing the whole sequence without a cache (float32, tiny models)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import inference
import models
from models.rope import rope_tables
from tests.inference import tiny_models

B, T, N = 2, 6, 10  # T + N = 16 > YaRN's original length 8
TOL = 1e-4


def _stepwise_greedy(model, ids_BT, kind):
  """Greedy tokens [B, N] and step logits [B, N, V] through jit_prefill + one jit_decode_step per token."""
  cache = inference.init_cache(model.cfg, B, T + N, kind)
  logits_BV, cache = inference.jit_prefill(model, ids_BT, jnp.full((B,), T), cache)
  steps, tokens = [], []
  for step in range(N):
    steps.append(np.asarray(logits_BV))
    tokens.append(np.argmax(steps[-1], axis=-1).astype(np.int32))
    if step < N - 1:
      logits_BV, cache = inference.jit_decode_step(model, tokens[-1], cache)
  np.testing.assert_array_equal(cache.lengths, np.full((B,), T + N - 1))
  return np.stack(tokens, 1), np.stack(steps, 1)


def _looped_greedy(model, ids_BT, kind):
  """The same through generate's single compiled loop."""
  out = inference.generate_full(model, ids_BT, N, temperature=0.0, cache=kind, output_logits=True)
  return np.asarray(out.tokens)[:, T:], np.asarray(out.logits)


class CachedDecodeTest(parameterized.TestCase):

  # Each style runs the latent cache through one driver and the expanded cache through the other, so
  # both caches and both drivers (step functions, one-call loop) are covered at two compiles each.
  @parameterized.parameters(("v3", _looped_greedy, _stepwise_greedy),
                            ("v2_lite", _stepwise_greedy, _looped_greedy))
  def test_cached_greedy_matches_full_recompute(self, style, run_latent, run_expanded):
    cfg = tiny_models.STYLES[style]()
    model = tiny_models.build(cfg)
    ids_BT = tiny_models.prompts(cfg, B, T, seed=1)
    tokens, logits = run_latent(model, ids_BT, "latent")
    chex.assert_shape(logits, (B, N, cfg.vocab_size))

    # Full recompute without a cache: the whole sequence so far through model(ids) at every step.
    # One compiled shape: the sequence grows into a fixed [B, T+N] buffer whose not-yet-generated tail
    # cannot influence earlier logits (causal attention; dropless MoE routes each token on its own).
    full = jax.jit(lambda ids: model(ids))
    seq = np.zeros((B, T + N), np.int32)
    seq[:, :T] = ids_BT
    for step in range(N):
      ref_BV = np.asarray(full(seq))[:, T + step - 1]
      top2 = np.sort(ref_BV, axis=-1)[:, -2:]
      self.assertGreater((top2[:, 1] - top2[:, 0]).min(), 10 * TOL)  # a decisive greedy step
      np.testing.assert_allclose(logits[:, step], ref_BV, atol=TOL, rtol=0, err_msg=f"step {step}")
      np.testing.assert_array_equal(tokens[:, step], np.argmax(ref_BV, axis=-1), err_msg=f"step {step}")
      seq[:, T + step] = tokens[:, step]

    expanded_tokens, expanded_logits = run_expanded(model, ids_BT, "expanded")
    np.testing.assert_array_equal(expanded_tokens, tokens)
    np.testing.assert_allclose(expanded_logits, logits, atol=TOL, rtol=0)

  def test_different_prompt_lengths_match_each_prompt_alone(self):
    # A token-dropping training execution: generation must switch it to dropless routing, or a row's
    # tokens would depend on the rest of the batch (they do here with capacity_factor 1).
    cfg = tiny_models.v3_style()
    model = tiny_models.build(cfg, seed=2)
    dropping = models.Execution(moe_backend="capacity", capacity_factor=1.0)
    lengths = [3, 7]
    ids_BT = tiny_models.prompts(cfg, 2, 7, seed=3)  # junk (not pad) after the short prompt
    batch = inference.generate_full(model, ids_BT, N, prompt_lengths=lengths, pad_id=-1, execution=dropping)
    out = np.asarray(batch.tokens)
    chex.assert_shape(out, (2, 7 + N))
    np.testing.assert_array_equal(np.asarray(batch.num_generated), [N] * 2)
    for b, length in enumerate(lengths):
      alone = np.asarray(inference.generate(model, ids_BT[b:b + 1, :length], N))
      np.testing.assert_array_equal(out[b, :length + N], alone[0], err_msg=f"row {b}")
      np.testing.assert_array_equal(out[b, length + N:], -1)

  def test_prefill_caches_exactly_the_latent(self):
    """Latent cache slot p of layer 0 holds kv_norm(c) and roped k_pe of prompt token p."""
    cfg = tiny_models.v2_lite_style()
    model = tiny_models.build(cfg)
    ids_BT = tiny_models.prompts(cfg, B, T)
    cache = inference.init_cache(cfg, B, T + N)
    _, cache = inference.jit_prefill(model, ids_BT, jnp.full((B,), T), cache)
    block = jax.tree.map(lambda a: a[0], model.dense_layers)  # layer 0 of the dense stack
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_tables(positions, cfg)
    c, k_pe = block.attn.latent(block.attn_norm(model.embed_tokens(ids_BT)), cos, sin)
    np.testing.assert_allclose(cache.dense["c"][0, :, :T], c, atol=1e-6)
    np.testing.assert_allclose(cache.dense["k_pe"][0, :, :T], k_pe, atol=1e-6)
    np.testing.assert_array_equal(cache.dense["c"][0, :, T:], 0)


if __name__ == "__main__":
  absltest.main()
