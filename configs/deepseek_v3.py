"""DeepSeek-V3 (671B total, ~37B activated per token; 61 layers, 256 routed + 1 shared experts, MTP).

The released architecture, for planning and for importing the released weights:
  python -m tools.plan --config=configs/deepseek_v3.py
prints total_params: 671.0B, activated_params: ~37B. Training it needs a TPU pod or a GPU cluster.
"""

from configs.common import RELEASED_NUMERICS, released_rope, run_config


def get_config():
  config = run_config(dict(
      vocab_size=129280,
      hidden_size=7168,
      num_layers=61,  # main model; the MTP module adds one more block
      num_heads=128,
      q_lora_rank=1536,
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      first_k_dense=3,  # layers 0-2 are dense
      dense_intermediate_size=18432,
      n_routed_experts=256,
      n_shared_experts=1,
      moe_intermediate_size=2048,
      num_experts_per_tok=8,
      score_func="sigmoid",  # sigmoid affinities, selection bias for aux-loss-free balancing
      router_bias=True,
      n_group=8,  # node-limited routing: 8 groups, keep the best 4 by top-2-sum
      topk_group=4,
      group_score="top2_sum",
      norm_topk_prob=True,
      routed_scaling_factor=2.5,
      **released_rope(mscale=1.0),
      mtp_depth=1,
      **RELEASED_NUMERICS,
  ))
  config.optim.moment_dtype = "bfloat16"  # V3 keeps AdamW's moments in BF16 (its report: low-precision storage)
  return config
