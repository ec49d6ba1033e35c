"""The R1-Zero recipe at toy scale: a base model, GRPO with a rule-based reward, distillation into a dense student.

  python train.py --config=configs/r1_zero_tiny.py:base --workdir=/tmp/r1/base
  python train.py --config=configs/r1_zero_tiny.py:grpo --workdir=/tmp/r1/grpo --config.init_from=/tmp/r1/base
  python train.py --config=configs/r1_zero_tiny.py:distill --workdir=/tmp/r1/student \
      --config.distill.teacher=/tmp/r1/grpo
  python eval.py --workdir=/tmp/r1/grpo --tasks=arithmetic --task_examples=500     # and on base, student

- `:base` pretrains the tiny MoE model (configs/tiny.py's architecture) on arithmetic text from the
  `arithmetic/decimal` dataset (2-digit + and -; data/arithmetic.py), where 9 in 10 answers carry a
  decimal part ("37-12=25.0"), as a spreadsheet would write them: the base learns the sums and that
  style, and the exact-match reward accepts only the canonical answer ("25");
- `:grpo` samples 8 answers to each of 16 training problems per step, rewards an exact canonical answer
  (`arithmetic_exact`), and takes a GRPO step against the frozen base (k3 KL, β = 0.01): the reward
  alone has to teach the model which form to answer in, and to get the value right;
- `:distill` has the GRPO model answer the training problems once (greedy; JSONL under the workdir)
  and trains a smaller dense student (no MoE layers) on those answers, loss on the answers only;
- `:test` is `:base` shrunk for end-to-end tests (seconds).
Measured figures: README.md, "Reasoning (R1-Zero) and distillation".
"""

import ml_collections

from configs import tiny
from configs.common import run_config


def _inherit_model(config) -> None:
  """A model section that takes the architecture from init_from (only the dtypes may be set)."""
  config.model = ml_collections.ConfigDict({
      "dtype": ml_collections.FieldReference(None, field_type=str),
      "param_dtype": ml_collections.FieldReference(None, field_type=str),
  })


def get_config(arg: str | None = None):
  variant = arg or "base"
  if variant in ("base", "test"):
    config = tiny.get_config("test" if variant == "test" else None)
    config.data.dataset = "arithmetic/decimal"
    config.model.update(max_position_embeddings=64 if variant == "test" else 128)
    config.update(total_steps=1200, batch_size=16, seq_len=64, log_every=100, eval_every=600, eval_batches=8,
                  checkpoint_every=600)
    if variant == "test":
      config.update(total_steps=4, batch_size=8, seq_len=32, log_every=1, eval_every=2, eval_batches=2,
                    checkpoint_every=2)
    return config
  if variant == "grpo":
    config = run_config({})
    _inherit_model(config)
    config.execution.moe_backend = "capacity"
    config.objective = "grpo"
    config.data.dataset = "arithmetic/decimal"
    config.grpo.update(group_size=8, prompts_per_step=16, num_iterations=1, kl_beta=0.01, max_new_tokens=8,
                       temperature=1.0, rewards="arithmetic_exact:1.0,canonical_number:0.5", eval_prompts=200)
    config.update(total_steps=300, seq_len=64, log_every=10, eval_every=100, checkpoint_every=100)
    config.optim.update(peak_lr=1e-4, warmup_fraction=0.05, decay_start_fraction=1.0, weight_decay=0.0)
    return config
  if variant == "distill":
    config = tiny.get_config()
    config.model.update(first_k_dense=4, dense_intermediate_size=256, mtp_depth=0, max_position_embeddings=128)
    config.objective = "distill"
    config.data.dataset = "arithmetic/decimal"
    config.distill.update(mode="sequence", num_prompts=0, max_new_tokens=8, teacher_temperature=0.0)
    config.update(total_steps=2000, batch_size=16, seq_len=64, log_every=100, eval_every=1000, eval_batches=0,
                  checkpoint_every=1000)
    config.optim.update(peak_lr=3e-3, warmup_fraction=0.05, decay_start_fraction=0.5, weight_decay=0.1)
    return config
  raise ValueError(f"unknown r1_zero_tiny variant {arg!r} (known: base, grpo, distill, test)")
