"""Pieces shared by the config files: the run-level defaults around a model definition."""

import ml_collections

from data import config as data_config
from models import lora


def released_rope(mscale: float) -> dict:
  """Model fields of the released V2/V3 rope: a 4K pretraining context stretched 40x by YaRN.

  V3 uses mscale = mscale_all_dim = 1.0 (attention scale unchanged), V2 and V2-Lite 0.707.
  """
  return dict(max_position_embeddings=163840, rope_theta=10000.0, rope_type="yarn", rope_factor=40.0,
              original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
              mscale=mscale, mscale_all_dim=mscale)


# Model fields every released model shares: norm epsilon, init scale, bf16 compute on fp32 master weights.
RELEASED_NUMERICS = dict(rms_norm_eps=1e-6, init_std=0.006, dtype="bfloat16", param_dtype="float32")


def data_defaults() -> ml_collections.ConfigDict:
  """The run config's `data` section: data/config.py's defaults (the embedded corpus, byte tokenizer)."""
  return data_config.default_data_config()


def run_config(model: dict, **run_fields) -> ml_collections.ConfigDict:
  """Wraps model fields (ModelConfig names, see models/config.py) in a run config.

  The model part becomes a frozen `models.ModelConfig` via `models.from_dict(config.model.to_dict())`;
  layers never see the run config. How the model runs is the `execution` section (models/execution.py),
  e.g. `--config.execution.moe_backend=capacity`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed for initialisation and data order
  c.model = ml_collections.ConfigDict(model)
  c.execution = ml_collections.ConfigDict(dict(
      moe_backend="dropless",  # dropless (sort + grouped matmul) | capacity (token-dropping buffer)
      capacity_factor=1.25,  # capacity backend: slots per expert = ceil(cf * tokens * top_k / experts)
      grouped_matmul="auto",  # dropless kernel: xla (lax.ragged_dot) | pallas, tokamax (GPU) | auto
      attention_impl="xla",  # xla (einsums, any device) | cudnn (fused flash attention; GPU, bf16)
      remat_policy="none",  # none | full | dots: what the backward pass recomputes per layer
      unroll_layers=False,  # True: the layer stacks unrolled (no while loop; compile time grows with depth)
      cast_weights_once=False,  # True: matmul weights cast to the compute dtype before the forward (bf16 grads)
      logits_dtype="float32",  # float32 | compute: the LM heads' output (compute: bf16 logits, half the traffic)
      dispatch_factor=0.0,  # expert parallelism: send-buffer rows per shard / balanced share (0: worst case)
  ))
  c.data = data_defaults()
  # pretrain (every next token) | sft (completion tokens only; data.dataset=sft_jsonl) | grpo (RL on rule-based
  # rewards, training/grpo_trainer.py) | distill (a frozen teacher's completions or logits, training/distill.py)
  c.objective = "pretrain"
  # Start from trained weights (a fresh optimizer at step 0, in a new workdir): a workdir (its newest
  # checkpoint; DIR@STEP for another) or an HF DeepSeek directory. The architecture then comes from there.
  c.init_from = ""
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,  # > 0: train LoRA adapters of this rank on the frozen init_from weights (models/lora.py)
      alpha=16.0,  # adapters scale by alpha / rank
      dropout=0.0,  # rank dropout: each rank component is dropped with this probability per step
      targets=lora.DEFAULT_TARGETS,  # regex searched in parameter paths such as moe_layers/attn/wq_b
      base_dtype="",  # the frozen base's dtype: "" = param dtype, bfloat16 halves its memory
      b_lr_ratio=1.0,  # LoRA+: the B matrices' learning rate is this multiple of optim.peak_lr's schedule
      init="random",  # A's start: random (PEFT's) | gradient (top singular directions of the first batch's gradient)
  ))

  c.grpo = ml_collections.ConfigDict(dict(  # objective = grpo: DeepSeekMath / R1-Zero GRPO
      group_size=8,  # G completions sampled per prompt; advantages are relative to the group
      prompts_per_step=16,  # prompts per step (the rollout batch is prompts_per_step * group_size)
      num_iterations=1,  # μ: optimizer steps on each rollout batch (μ > 1 makes the clipping matter)
      clip_epsilon=0.2,  # ε: the ratio is clipped to [1 - ε, 1 + ε_high]
      clip_epsilon_high=0.0,  # ε_high (DAPO's clip-higher); 0 = clip_epsilon
      kl_beta=0.04,  # β of the k3 KL penalty to the frozen init_from model; 0 skips the reference model
      loss_aggregation="sequence_mean",  # sequence_mean (GRPO) | token_mean (DAPO) | dr_grpo (Dr. GRPO)
      scale_rewards=True,  # divide advantages by the group's reward std (Dr. GRPO: False)
      max_new_tokens=16,  # completion budget per rollout (a row that hits it without EOS is kept)
      temperature=1.0,  # rollout sampling temperature (the log-probabilities use the same one)
      top_p=1.0,  # rollout nucleus sampling; 1 = off
      rewards="arithmetic_exact:1.0",  # name:weight list (training/rewards.py); dotted names import yours
      eval_prompts=200,  # held-out prompts for eval/accuracy (greedy) at each eval
  ))
  c.distill = ml_collections.ConfigDict(dict(  # objective = distill
      teacher="",  # a workdir (DIR@STEP) or an HF directory: frozen, same tokenizer as the student
      mode="sequence",  # sequence: SFT on the teacher's completions | logits: KL(teacher || student) + CE
      num_prompts=0,  # sequence: prompts the teacher completes (0 = all train prompts)
      max_new_tokens=16,  # sequence: teacher completion budget
      teacher_temperature=0.0,  # sequence: 0 = greedy teacher completions
      temperature=1.0,  # logits: τ of both softmaxes (the KL term is scaled by τ²)
      alpha=0.5,  # logits: loss = alpha * KL + (1 - alpha) * CE
  ))

  c.total_steps = 1000
  c.batch_size = 16  # global sequences per optimizer step
  c.seq_len = 256
  c.grad_accum_steps = 1  # microbatches per step (batch_size must divide evenly)
  c.log_every = 10
  c.eval_every = 200  # 0 disables periodic eval (one eval still runs at the end)
  c.eval_batches = 16  # validation batches per eval; 0 = the whole validation split
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.peak_flops_per_device = 0.0  # for perf/mfu; 0 = look up the device kind (unknown → no MFU)

  # Parallelism: product must equal the device count; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

  # The V3 recipe: AdamW, linear warmup, constant, cosine decay to a floor; clip 1.0.
  c.optim = ml_collections.ConfigDict(dict(
      peak_lr=2.2e-4,
      min_lr_ratio=0.1,  # final lr = min_lr_ratio * peak_lr (V3: 2.2e-5)
      warmup_fraction=0.01,  # of total_steps
      decay_start_fraction=0.8,  # cosine decay starts at this fraction of total_steps
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,  # not applied to norms, biases or the router bias
      clip_norm=1.0,
      moment_dtype="float32",  # Adam moments' storage: "float32" or "bfloat16" (V3 stores them in BF16)
  ))
  c.loss = ml_collections.ConfigDict(dict(
      balance_alpha=1e-4,  # sequence-wise balance loss weight α
      mtp_lambda=0.3,  # MTP loss weight λ (V3: 0.3, later 0.1)
      bias_update_speed=1e-3,  # γ of the aux-loss-free router bias update
  ))
  c.update(run_fields)
  return c
