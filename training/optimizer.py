"""AdamW with DeepSeek-V3's schedule: linear warmup, constant, cosine decay to a floor; clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """lr(step): 0 → peak over warmup, peak until decay start, cosine to min_lr_ratio·peak at the end."""
  peak = optim.peak_lr
  warmup = max(1, int(round(optim.warmup_fraction * total_steps)))
  decay_start = max(warmup, int(round(optim.decay_start_fraction * total_steps)))
  decay_steps = max(1, total_steps - decay_start)
  floor = optim.min_lr_ratio * peak

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(step + 1, warmup) / warmup
    progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, jnp.where(step < decay_start, peak, cosine))

  return schedule


def decay_mask(params):
  """True for parameters that get weight decay: matrices, not norm scales or biases."""
  def decays(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.endswith("bias") or jnp.ndim(leaf) <= 1)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim, total_steps: int, *, lora_b_lr_ratio: float = 1.0) -> optax.GradientTransformation:
  """Clipping, then AdamW on the schedule. lora_b_lr_ratio != 1 (LoRA+, Hayou et al. 2024): the LoRA
  adapters' B matrices (leaves named `b`, training/adapters.py) take that multiple of the learning rate."""
  schedule = learning_rate_schedule(optim, total_steps)
  adamw = lambda lr: optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                                 mask=decay_mask)
  if lora_b_lr_ratio == 1.0:
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw(schedule))
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "b" if str(getattr(path[-1], "key", "")) == "b" else "rest", params)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.multi_transform({"rest": adamw(schedule), "b": adamw(lambda step: lora_b_lr_ratio * schedule(step))},
                            labels),
  )
