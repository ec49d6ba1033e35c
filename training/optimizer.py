"""AdamW with DeepSeek-V3's schedule: linear warmup, constant, cosine decay to a floor; clipping.

`optim.moment_dtype` is the dtype Adam's two moments are stored in: "float32" (optax's AdamW, the
default) or "bfloat16", as DeepSeek-V3 trains (its report: BF16 moments, no observable degradation).
bf16 moments halve the optimizer state and cut the memory-bound update's traffic from 28 to 20 bytes
per parameter; each step computes in float32 and rounds only what it stores.
"""

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


def leaf_name(key) -> str:
  """The name of one entry of a pytree path: a dict key or a dataclass field."""
  return str(getattr(key, "key", getattr(key, "name", key)))


def is_matrix(path, leaf) -> bool:
  """Whether a parameter is a weight matrix: not 1-D, not a norm scale or a bias ([L, D] when stacked)."""
  name = leaf_name(path[-1])
  return not (name == "scale" or name.endswith("bias") or jnp.ndim(leaf) <= 1)


def decay_mask(params):
  """True for parameters that get weight decay: matrices (`is_matrix`), not norm scales or biases."""
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
  """Adam's bias-corrected direction m̂ / (√v̂ + eps) with both moments stored in `moment_dtype`
  (optax's `ScaleByAdamState`). The step's moments are computed in float32 and used unrounded."""
  dtype = jnp.dtype(moment_dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), dtype)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                  nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32),
                      updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      updates, state.nu)
    t = count.astype(jnp.float32)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    direction = jax.tree.map(lambda g, m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), updates, mu, nu)
    store = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
    return direction, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

  return optax.GradientTransformation(init, update)


def adamw(optim, learning_rate) -> optax.GradientTransformation:
  """AdamW with the run's betas, eps, weight decay (on `decay_mask`) and moment dtype."""
  moment_dtype = optim.get("moment_dtype", "float32")
  if moment_dtype == "float32":
    return optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  if moment_dtype != "bfloat16":
    raise ValueError(f"optim.moment_dtype must be 'float32' or 'bfloat16', got {moment_dtype!r}")
  return optax.chain(scale_by_adam(optim.b1, optim.b2, optim.eps, moment_dtype),
                     optax.add_decayed_weights(optim.weight_decay, decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


def make_optimizer(optim, total_steps: int, *, lora_b_lr_ratio: float = 1.0) -> optax.GradientTransformation:
  """Clipping, then AdamW on the schedule. lora_b_lr_ratio != 1 (LoRA+, Hayou et al. 2024): the LoRA
  adapters' B matrices (leaves named `b`, training/adapters.py) take that multiple of the learning rate."""
  schedule = learning_rate_schedule(optim, total_steps)
  if lora_b_lr_ratio == 1.0:
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw(optim, schedule))
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "b" if str(getattr(path[-1], "key", "")) == "b" else "rest", params)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.multi_transform({"rest": adamw(optim, schedule),
                             "b": adamw(optim, lambda step: lora_b_lr_ratio * schedule(step))},
                            labels),
  )
