"""Cache layouts and sizes: the latent cache holds kv_lora_rank + qk_rope_head_dim values per token
per layer (576 for DeepSeek-V3) against the expanded cache's H·(qk + v) (40960)."""

import chex
import jax
import jax.numpy as jnp
from absl.testing import absltest

import inference
import models
from configs import deepseek_v3
from tests.inference import tiny_models


class CacheTest(chex.TestCase):

  def test_latent_cache_holds_kv_lora_plus_rope_values(self):
    cfg = tiny_models.v3_style()
    cache = inference.init_cache(cfg, batch=2, max_length=11)
    self.assertEqual(cache.kind, "latent")
    self.assertEqual(cache.max_length, 11)
    for stack, layers in ((cache.dense, cfg.first_k_dense), (cache.moe, cfg.num_moe_layers)):
      self.assertEqual(set(stack), {"c", "k_pe"})
      chex.assert_shape(stack["c"], (layers, 2, 11, cfg.kv_lora_rank))
      chex.assert_shape(stack["k_pe"], (layers, 2, 11, cfg.qk_rope_head_dim))
    report = inference.cache_report(cfg)
    self.assertEqual(report.latent_values, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    self.assertEqual(report.expanded_values, cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim))
    self.assertEqual(report.num_layers, cfg.num_layers)  # the MTP block gets no cache

  def test_expanded_cache_layout(self):
    cfg = tiny_models.v2_lite_style()
    cache = inference.init_cache(cfg, batch=3, max_length=5, kind="expanded", dtype=jnp.bfloat16)
    self.assertEqual(cache.kind, "expanded")
    chex.assert_shape(cache.moe["k"], (cfg.num_moe_layers, 3, 5, cfg.num_heads, cfg.qk_head_dim))
    chex.assert_shape(cache.moe["v"], (cfg.num_moe_layers, 3, 5, cfg.num_heads, cfg.v_head_dim))
    self.assertEqual(cache.moe["k"].dtype, jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "unknown cache kind"):
      inference.init_cache(cfg, 1, 1, kind="paged")

  def test_deepseek_v3_report(self):
    cfg = models.from_dict(deepseek_v3.get_config().model.to_dict())
    report = inference.cache_report(cfg)  # abstract: jax.eval_shape of init_cache
    self.assertEqual((report.latent_values, report.expanded_values), (576, 40960))
    self.assertAlmostEqual(report.ratio, 40960 / 576)
    self.assertEqual(report.num_layers, 61)
    self.assertEqual(report.dtype, "bfloat16")  # V3 computes (and caches) in bf16
    self.assertEqual(report.latent_bytes_per_token, 576 * 61 * 2)
    self.assertEqual(report.expanded_bytes_per_token, 40960 * 61 * 2)
    self.assertIn("576 latent vs 40960 expanded", str(report))
    # A 128K-token context of one sequence: ~8.4 GiB latent against ~596 GiB expanded.
    self.assertEqual(inference.cache_bytes(cfg, 1, 131072), 576 * 61 * 2 * 131072)
    abstract = jax.eval_shape(lambda: inference.init_cache(cfg, 4, 1024))
    chex.assert_shape(abstract.dense["c"], (3, 4, 1024, 512))
    chex.assert_shape(abstract.moe["k_pe"], (58, 4, 1024, 64))


if __name__ == "__main__":
  absltest.main()
