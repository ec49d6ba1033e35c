"""DeepSeek-V2-Lite (15.7B total, ~2.4B activated; 27 layers, 64 routed + 2 shared experts, no q LoRA).

  python -m tools.plan --config=configs/deepseek_v2_lite.py
prints total_params: ~15.7B, activated_params: ~2.4B.
"""

from configs.common import run_config


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
      max_position_embeddings=163840,
      rope_theta=10000.0,
      rope_type="yarn",
      rope_factor=40.0,
      original_max_position_embeddings=4096,
      beta_fast=32.0,
      beta_slow=1.0,
      mscale=0.707,
      mscale_all_dim=0.707,
      mtp_depth=0,
      rms_norm_eps=1e-6,
      init_std=0.006,
      dtype="bfloat16",
      param_dtype="float32",
  )


def get_config():
  return run_config(model_fields())
