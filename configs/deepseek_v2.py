"""DeepSeek-V2 (236B total, ~21B activated; 60 layers, 160 routed + 2 shared experts, softmax routing).

  python -m tools.plan --config=configs/deepseek_v2.py
prints total_params: ~235.7B, activated_params: ~21B.
"""

from configs.common import RELEASED_NUMERICS, released_rope, run_config


def get_config():
  return run_config(dict(
      vocab_size=102400,
      hidden_size=5120,
      num_layers=60,
      num_heads=128,
      q_lora_rank=1536,
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      first_k_dense=1,
      dense_intermediate_size=12288,
      n_routed_experts=160,
      n_shared_experts=2,
      moe_intermediate_size=1536,
      num_experts_per_tok=6,
      score_func="softmax",
      router_bias=False,
      n_group=8,  # device-limited routing: keep the best 3 of 8 groups by their max score
      topk_group=3,
      group_score="max",
      norm_topk_prob=False,
      routed_scaling_factor=16.0,
      **released_rope(mscale=0.707),
      mtp_depth=0,
      **RELEASED_NUMERICS,
  ))
