"""benchmarks/decode.py: the roofline arithmetic, argument parsing and one timed row on a tiny model
(the figures themselves come from a GPU; see benchmarks/RESULTS.md)."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

import models
from benchmarks import decode as bench

# A V2-Lite-style model (single wq, no router bias, no MTP) of TINY_MODEL's sizes, in bf16.
CFG = models.ModelConfig(**dict(
    bench.TINY_MODEL, q_lora_rank=None, score_func="softmax", router_bias=False, norm_topk_prob=False,
    routed_scaling_factor=1.0, rope_type="default", mtp_depth=0, dtype="bfloat16", param_dtype="bfloat16"))


def _abstract_state(cfg):
  return nnx.state(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))


class RooflineTest(absltest.TestCase):

  def test_decode_bytes_by_hand(self):
    c = CFG
    d, h, v, e, k = c.hidden_size, c.num_heads, c.vocab_size, c.n_routed_experts, c.num_experts_per_tok
    attn = (d * h * c.qk_head_dim + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
    dense_layer = attn + 2 * d + 3 * d * c.dense_intermediate_size
    experts = 3 * e * d * c.moe_intermediate_size
    moe_layer = attn + 2 * d + d * e + 3 * d * c.n_shared_experts * c.moe_intermediate_size
    batch, positions = 3, 10.5
    fraction = 1 - (1 - k / e) ** batch  # routed experts some token picks, in expectation
    weights = 2 * (batch * d + d * v + d + dense_layer * c.first_k_dense
                   + c.num_moe_layers * (moe_layer + fraction * experts))
    cache = 2 * c.num_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * batch * positions
    got = bench.decode_bytes(c, _abstract_state(c), batch, positions, "latent")
    self.assertAlmostEqual(got["weights"], weights, delta=1e-6 * weights)
    self.assertAlmostEqual(got["cache"], cache, delta=1e-6 * cache)
    self.assertAlmostEqual(got["total"], weights + cache, delta=1e-6 * weights)
    expanded = bench.decode_bytes(c, _abstract_state(c), batch, positions, "expanded")["cache"]
    self.assertAlmostEqual(expanded, 2 * c.num_layers * h * (c.qk_head_dim + c.v_head_dim) * batch * positions)

  def test_mtp_is_not_read_and_every_expert_is_read_by_a_large_batch(self):
    with_mtp = CFG.replace(mtp_depth=1)
    self.assertEqual(bench.decode_bytes(with_mtp, _abstract_state(with_mtp), 4, 8, "latent"),
                     bench.decode_bytes(CFG, _abstract_state(CFG), 4, 8, "latent"))
    self.assertAlmostEqual(bench.expected_experts_read(CFG, 10_000), CFG.n_routed_experts)
    self.assertAlmostEqual(bench.expected_experts_read(CFG, 1), CFG.num_experts_per_tok)

  def test_bandwidth_table_and_override(self):
    self.assertEqual(bench.bandwidth_for("NVIDIA H200"), 4.8e12)
    self.assertEqual(bench.bandwidth_for("NVIDIA H100 80GB HBM3"), 3.35e12)
    self.assertIsNone(bench.bandwidth_for("cpu"))
    self.assertEqual(bench.bandwidth_for("cpu", 1e11), 1e11)


class ArgumentsTest(absltest.TestCase):

  def test_grid_and_variants(self):
    self.assertEqual(bench.parse_grid("32x256x64"), (32, 256, 64))
    for bad in ("32x256", "0x1x1", "axbxc"):
      with self.assertRaises(ValueError):
        bench.parse_grid(bad)
    self.assertEqual(bench.parse_variant("reference"), ({"grouped_matmul": "xla"}, {}))
    self.assertEqual(bench.parse_variant("auto+attn=cudnn+small=module+gu=64x128x4x3"),
                     ({"attention_impl": "cudnn"},
                      {"small": "module", "gu": dict(block_n=64, block_k=128, num_warps=4, num_stages=3)}))
    for bad in ("fast", "auto+attn", "auto+small=dense", "auto+gu=1x2"):
      with self.assertRaises(ValueError):
        bench.parse_variant(bad)

  def test_settings_apply_for_the_row_and_are_restored(self):
    from inference import attention, experts  # pylint: disable=import-outside-toplevel
    from models import experts as model_experts  # pylint: disable=import-outside-toplevel
    read = lambda: (model_experts.COUNTING_SORT_MAX, experts.DECODE_MLP_MULTIPLE, attention.STREAMED_PROJECTIONS,
                    experts.ROUTE_KERNEL, experts.SMALL_DENSE_KERNEL, dict(experts.TILES["gate_up"]),
                    dict(experts.INT8_TILES["down"]))
    before = read()
    _, settings = bench.parse_variant("auto+sort=argsort+pad=0+proj=kernel+route=kernel+dense=kernel+lhs=weights"
                                      "+gu=32x64x4x2+q=int8+xla=xla_cpu_foo:1")
    self.assertEqual(settings["xla"], {"xla_cpu_foo": 1})
    with bench.experts_settings(settings):
      sort_max, multiple, proj, route, dense, gate_up, int8_down = read()
      self.assertEqual((sort_max, multiple, proj, route, dense), (0, 0, True, True, True))
      self.assertEqual(gate_up, dict(block_n=32, block_k=64, num_warps=4, num_stages=2, weights_lhs=True))
      self.assertTrue(int8_down["weights_lhs"])
    self.assertEqual(read(), before)


class TimedRowTest(absltest.TestCase):

  def test_one_row_on_the_cpu(self):
    cfg = CFG.replace(num_layers=2)  # one dense, one MoE layer: the smallest compile with both
    model = bench.build_model(cfg)
    head = np.asarray(model.lm_head[...].astype(jnp.float32))
    self.assertLess(np.mean(head == 0), 0.05)  # random weights (bf16 rounds a few to 0), not zeros
    self.assertGreater(head.std(), 0.5 * cfg.init_std)
    row = bench.time_row(model, models.Execution().for_inference().resolve("cpu"), 2, 5, 3, "latent",
                         warmup=0, repeats=1)
    for key in ("prefill_ms", "prefill_tokens_per_s", "decode_ms_per_step", "decode_tokens_per_s"):
      self.assertGreater(row[key], 0, key)
    self.assertTrue(np.all((np.asarray(row["first_tokens"]) >= 0)
                           & (np.asarray(row["first_tokens"]) < cfg.vocab_size)))


if __name__ == "__main__":
  absltest.main()
