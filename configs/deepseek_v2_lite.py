"""DeepSeek-V2-Lite (15.7B total, ~2.4B activated; 27 layers, 64 routed + 2 shared experts, no q LoRA).

  python -m tools.plan --config=configs/deepseek_v2_lite.py
prints total_params: ~15.7B, activated_params: ~2.4B.
"""

from configs.common import RELEASED_NUMERICS, released_rope, run_config


def model_fields():
  return dict(
      vocab_size=102400,
      hidden_size=2048,
      num_layers=27,
      num_heads=16,
      q_lora_rank=None,  # a single wq projection
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      first_k_dense=1,
      dense_intermediate_size=10944,
      n_routed_experts=64,
      n_shared_experts=2,
      moe_intermediate_size=1408,
      num_experts_per_tok=6,
      score_func="softmax",
      router_bias=False,
      n_group=1,  # plain greedy top-k
      topk_group=1,
      norm_topk_prob=False,
      routed_scaling_factor=1.0,
      **released_rope(mscale=0.707),
      mtp_depth=0,
      **RELEASED_NUMERICS,
  )


def get_config():
  return run_config(model_fields())
