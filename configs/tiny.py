"""A tiny DeepSeek-V3-style model (MLA with q LoRA, sigmoid routing with groups and bias, MTP) that
trains on a 2-core CPU in minutes on the embedded Python-stdlib corpus. Byte-level vocabulary (256).

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny

Measured 2026-11-23 on a 2-core CPU (no GPU), first use included (corpus build into a fresh data
dir, compile, 800 steps of 16x128 bytes, two evals): 3 min 20 s wall, ~9.2k tokens/s, final
eval/bits_per_byte 2.398 (eval/loss 1.662 nats/byte) on the validation split.
  python train.py --config=configs/tiny.py:test --workdir=/tmp/t   # a smaller model for tests (seconds)
"""

from configs.common import run_config


def get_config(arg: str | None = None):
  config = run_config(dict(
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
  config.execution.moe_backend = "capacity"  # on CPU the gather + einsum buffer beats ragged_dot
  config.update(total_steps=800, batch_size=16, seq_len=128, log_every=50, eval_every=400, eval_batches=16,
                checkpoint_every=400)
  config.optim.update(peak_lr=3e-3, warmup_fraction=0.05, decay_start_fraction=0.4, weight_decay=0.1)
  if arg == "test":  # fast enough for end-to-end tests; still MLA + grouped sigmoid MoE + MTP
    config.model.update(hidden_size=32, num_layers=3, num_heads=4, q_lora_rank=16, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dense_intermediate_size=64,
                        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64, init_std=0.1)
    config.update(total_steps=6, batch_size=8, seq_len=32, log_every=1, eval_every=3, eval_batches=2,
                  checkpoint_every=3)
  elif arg:
    raise ValueError(f"unknown tiny config variant {arg!r} (known: test)")
  return config
