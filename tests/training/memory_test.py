"""training/memory.py: per-device bytes of configs/tiny.py on two meshes, against hand counts."""

from absl.testing import absltest, parameterized

import models
from configs import tiny
from training import memory


# configs/tiny.py, written out (test_the_tables_describe_tiny checks them).
D, V, H, QR, KVR, NOPE, ROPE, VH = 128, 256, 4, 64, 32, 32, 16, 32
FD, E, FM, K, SHARED = 384, 8, 64, 2, 1
DENSE_LAYERS, MOE_LAYERS, MTP = 1, 3, 1
BATCH, SEQ = 16, 128

SHARDED = dict(data=1, fsdp=2, expert=2, tensor=2)
DATA_ONLY = dict(data=8, fsdp=1, expert=1, tensor=1)


def tiny_run():
  config = tiny.get_config()
  return config, models.from_dict(config.model.to_dict())


def param_table(mesh):
  """(parameters, ways split) of every weight. sharding/rules.py's table: embed→fsdp, expert→expert,
  heads/vocab/mlp/moe_mlp→tensor; q_lora, kv_lora, kv, norm, layers, mtp_in are not split. Every
  split dim of tiny divides by 2."""
  fsdp, expert, tensor = mesh["fsdp"], mesh["expert"], mesh["tensor"]

  def block(ffn):
    return [
        (2 * D, 1),  # attn_norm, ffn_norm [norm]
        (D * QR, fsdp),  # wq_a [embed, q_lora]
        (QR, 1),  # q_norm [q_lora]
        (QR * H * (NOPE + ROPE), tensor),  # wq_b [q_lora, heads, kv]
        (D * (KVR + ROPE), fsdp),  # wkv_a [embed, kv_lora]
        (KVR, 1),  # kv_norm [kv_lora]
        (KVR * H * (NOPE + VH), tensor),  # wkv_b [kv_lora, heads, kv]
        (H * VH * D, tensor * fsdp),  # wo [heads, kv, embed]
    ] + ffn

  dense_ffn = [(3 * D * FD, fsdp * tensor)]  # gate, up [embed, mlp]; down [mlp, embed]
  moe_ffn = [
      (D * E, fsdp * expert),  # router kernel [embed, expert] (its bias is a buffer, not a Param)
      (3 * E * D * FM, expert * fsdp * tensor),  # routed experts [expert, embed, moe_mlp]
      (3 * D * SHARED * FM, fsdp * tensor),  # the shared expert [embed, mlp]
  ]
  rows = [(V * D, tensor * fsdp), (D * V, fsdp * tensor), (D, 1)]  # embed, lm_head, final_norm
  rows += DENSE_LAYERS * block(dense_ffn) + MOE_LAYERS * block(moe_ffn)
  rows += MTP * (block(moe_ffn) + [(3 * D, 1), (2 * D * D, fsdp)])  # enorm, hnorm, norm; eh_proj [mtp_in, embed]
  return rows


def param_bytes(mesh):
  return sum(4 * n / ways for n, ways in param_table(mesh))  # float32 master weights


class PlanMemoryTest(parameterized.TestCase):

  def test_the_tables_describe_tiny(self):
    config, cfg = tiny_run()
    self.assertEqual(
        (cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
         cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.dense_intermediate_size, cfg.n_routed_experts,
         cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.first_k_dense,
         cfg.num_moe_layers, cfg.mtp_depth, config.batch_size, config.seq_len, config.grad_accum_steps),
        (D, V, H, QR, KVR, NOPE, ROPE, VH, FD, E, FM, K, SHARED, DENSE_LAYERS, MOE_LAYERS, MTP, BATCH, SEQ, 1))
    self.assertEqual(cfg.param_dtype, "float32")
    self.assertEqual(cfg.dtype, "float32")
    self.assertEqual(sum(n for n, _ in param_table(DATA_ONLY)), 1_392_864)  # 1.09M main model + 0.31M MTP

  @parameterized.named_parameters(("sharded", SHARDED), ("data_only", DATA_ONLY))
  def test_params_grads_and_adam(self, mesh):
    config, cfg = tiny_run()
    plan = memory.plan_memory(config, cfg, mesh)
    self.assertEqual(plan.params, param_bytes(mesh))
    self.assertEqual(plan.grads, plan.params)
    self.assertEqual(plan.optimizer, 2 * plan.params)  # Adam's two moments, sharded like the weights
    self.assertEqual(plan.total, 4 * plan.params + plan.activations)
    config.optim.moment_dtype = "bfloat16"  # half the bytes per moment
    self.assertEqual(memory.plan_memory(config, cfg, mesh).optimizer, plan.params)

  def test_sharded_params_pinned(self):
    # 1_392_864 float32 parameters, all whole on DATA_ONLY. On SHARDED, 786_432 split 8 ways (routed
    # experts), 397_312 4 ways, 206_848 2 ways and 2_272 whole (norms):
    # 4·(98_304 + 99_328 + 103_424 + 2_272) = 1_213_312 bytes.
    self.assertEqual(param_bytes(DATA_ONLY), 4 * 1_392_864)
    self.assertEqual(param_bytes(SHARDED), 1_213_312)

  # The activation estimate, _activation_bytes with remat "none" (every layer's residuals kept).
  # float32 activations: b = 4 bytes; A = attention, F = FFN, per layer and device:
  #   A = n·b·(4D + QR + KVR + h·(2·(NOPE+ROPE) + 2·VH)) + n·h·SEQ·4·2   (h = H / tensor)
  #   F_dense = n·b·3·FD/tensor
  #   F_moe = n·b·(K·(2D + 3·FM/tensor) + 3·SHARED·FM/tensor) + n·4·3·E
  #   logits = n·(1 + MTP)·V/tensor·4·2, total = (A + F_dense) + 4·(A + F_moe) + logits (3 MoE + MTP)
  # SHARDED: n = 16·128 / (1·2·2) = 512 tokens, h = 2, tensor = 2
  #   A = 512·4·(512 + 64 + 32 + 2·160) + 512·2·128·8 = 1_900_544 + 1_048_576 = 2_949_120
  #   F_dense = 512·4·3·384/2 = 1_179_648
  #   F_moe = 512·4·(2·(256 + 96) + 96) + 512·12·8 = 1_638_400 + 49_152 = 1_687_552
  #   logits = 512·2·128·8 = 1_048_576
  #   total = 4_128_768 + 4·4_636_672 + 1_048_576 = 23_724_032
  # DATA_ONLY: n = 16·128 / 8 = 256 tokens, h = 4, tensor = 1
  #   A = 256·4·(512 + 64 + 32 + 4·160) + 256·4·128·8 = 1_277_952 + 1_048_576 = 2_326_528
  #   F_dense = 256·4·3·384 = 1_179_648
  #   F_moe = 256·4·(2·(256 + 192) + 192) + 256·12·8 = 1_114_112 + 24_576 = 1_138_688
  #   logits = 256·2·256·8 = 1_048_576
  #   total = 3_506_176 + 4·3_465_216 + 1_048_576 = 18_415_616
  @parameterized.named_parameters(("sharded", SHARDED, 23_724_032), ("data_only", DATA_ONLY, 18_415_616))
  def test_activations_pinned(self, mesh, expected):
    config, cfg = tiny_run()
    self.assertEqual(memory.plan_memory(config, cfg, mesh).activations, expected)

  def test_full_remat_keeps_layer_inputs_and_one_layer(self):
    # DATA_ONLY: 5 layer inputs of n·b·D = 256·4·128 = 131_072 bytes, the largest layer (dense,
    # 3_506_176) being recomputed, and the logits: 655_360 + 3_506_176 + 1_048_576 = 5_210_112.
    config, cfg = tiny_run()
    config.execution.remat_policy = "full"
    self.assertEqual(memory.plan_memory(config, cfg, DATA_ONLY).activations, 5_210_112)


class CheckFitsTest(absltest.TestCase):

  def plan(self, gib):
    return memory.MemoryPlan(params=gib / 4 * memory.GiB, grads=gib / 4 * memory.GiB, optimizer=gib / 4 * memory.GiB,
                             activations=gib / 4 * memory.GiB)

  def test_passes_below_ninety_percent(self):
    memory.check_fits(self.plan(8.0), 10 * memory.GiB)
    memory.check_fits(self.plan(1000.0), None)  # no known limit (CPU): nothing to check

  def test_raises_above_ninety_percent_with_the_numbers(self):
    # 9.5 GiB is under the raw 10 GiB but leaves less than the 10 % headroom.
    with self.assertRaisesRegex(ValueError, r"needs ~9\.5 GiB per device .* a device has 10\.0 GiB"):
      memory.check_fits(self.plan(9.5), 10 * memory.GiB)


if __name__ == "__main__":
  absltest.main()
