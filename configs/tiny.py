"""A tiny DeepSeek-V3-style model (MLA with q LoRA, sigmoid routing with groups and bias, MTP) that
trains on a 2-core CPU in seconds. Byte-level vocabulary (256).

  python -m tools.plan --config=configs/tiny.py
"""

from configs.common import run_config


def get_config():
  return run_config(dict(
      vocab_size=256,
      hidden_size=128,
      num_layers=4,
      num_heads=4,
      q_lora_rank=64,
      kv_lora_rank=32,
      qk_nope_head_dim=32,
      qk_rope_head_dim=16,
      v_head_dim=32,
      first_k_dense=1,
      dense_intermediate_size=384,
      n_routed_experts=8,
      n_shared_experts=1,
      moe_intermediate_size=64,
      num_experts_per_tok=2,
      score_func="sigmoid",
      router_bias=True,
      n_group=2,
      topk_group=1,
      group_score="top2_sum",
      norm_topk_prob=True,
      routed_scaling_factor=2.5,
      max_position_embeddings=1024,
      rope_theta=10000.0,
      rope_type="default",
      mtp_depth=1,
      rms_norm_eps=1e-6,
      init_std=0.02,
      dtype="float32",
      param_dtype="float32",
  ))
