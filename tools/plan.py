"""Plan a model before running it: parameters, activated parameters, FLOPs and cache sizes.

  python -m tools.plan --config=configs/deepseek_v3.py [--seq_len=4096]
  python -m tools.plan --config=configs/tiny.py --forward   # also init + jitted forward/backward
  python -m tools.plan --config=configs/deepseek_v3.py --devices=2048 --config.mesh.expert=64 \
      --config.mesh.fsdp=32 --device_memory_gb=80     # memory per device; refuses a plan that cannot fit

Counts come from the real module shapes (an abstract init; nothing is allocated).
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import models
import sharding
from models import counting
from training import loss as loss_lib
from training import memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Training sequence length for the FLOP estimate.")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count to plan the mesh for (default: this host's).")
_DEVICE_MEMORY_GB = flags.DEFINE_float("device_memory_gb", None, "Memory per device to check the plan "
                                       "against (default: what the local device reports, if anything).")
_FORWARD = flags.DEFINE_bool("forward", False, "Initialise the model and run a jitted forward+backward "
                             "pass on random tokens (only sensible for small configs).")


def _b(n: float) -> str:
  """Three significant figures or more: 671.0B, 20.9B, 2.45B, 0.44B, 12.34M."""
  if n >= 1e10:
    return f"{n / 1e9:.1f}B"
  return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def report(cfg: models.ModelConfig, seq_len: int) -> str:
  counts = counting.count_params(cfg)
  latent, expanded = counting.cache_values_per_token(cfg)
  lines = [
      f"total_params: {_b(counts.total)}",
      f"activated_params: {_b(counts.activated)}",
      f"embedding_params: {_b(counts.embedding)}",
      f"routed_expert_params: {_b(counts.routed_experts)}",
      f"mtp_params: {_b(counts.mtp)} (excluded from total; shares embedding and head)",
      f"train_flops_per_token: {counting.train_flops_per_token(cfg, seq_len):.4g} (seq_len {seq_len}, MTP included)",
      f"kv_cache_values_per_token_per_layer: {latent} latent vs {expanded} expanded "
      f"({expanded / latent:.1f}x smaller)",
      "params by component:",
  ]
  lines += [f"  {name:32s} {_b(n)}" for name, n in sorted(counts.by_component.items())]
  return "\n".join(lines)


def forward_backward(config, cfg: models.ModelConfig, batch: int = 2, length: int = 128) -> str:
  """One jitted training loss and its gradient on random tokens, one document per row: the loss of
  training/loss.py (cross-entropy + λ·MTP + α·balance) with the run config's `loss` weights, run as its
  `execution` section says. Reports the loss, its terms and timing."""
  length = min(length, cfg.max_position_embeddings)
  with_mtp = bool(cfg.mtp_depth)
  alpha, mtp_lambda = config.loss.balance_alpha, config.loss.mtp_lambda
  execution = models.execution_from_dict(config.get("execution") or {})
  model = models.Transformer(cfg, rngs=nnx.Rngs(config.seed))
  tokens = jax.random.randint(jax.random.key(config.seed + 1), (batch, length), 0, cfg.vocab_size)
  rows = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
          "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)}
  counts = loss_lib.step_counts(rows, with_mtp)

  def loss_fn(model):
    out = model.forward(rows["tokens"], rows["positions"], rows["segment_ids"], with_mtp=with_mtp,
                        execution=execution)
    terms = loss_lib.loss_terms(out, rows)
    return loss_lib.combine(terms, counts, 1, alpha=alpha, mtp_lambda=mtp_lambda), terms

  step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
  start = time.perf_counter()
  (loss, terms), grads = jax.block_until_ready(step(model))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(step(model))
  step_ms = 1e3 * (time.perf_counter() - start)
  grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(nnx.state(grads))))
  parts = f"ce {float(terms['ce_sum'] / counts['ce_count']):.4f}"
  if with_mtp:
    parts += f" + {mtp_lambda:g} x mtp_ce {float(terms['mtp_sum'] / counts['mtp_count']):.4f}"
  parts += f" + {alpha:g} x balance {float(terms['balance']):.4f}"
  return (f"forward_backward: loss {float(loss):.4f} = {parts} (ln V = {jnp.log(cfg.vocab_size):.4f}), "
          f"grad_norm {float(grad_norm):.4f}, batch {batch}x{length}, first call {compile_s:.1f}s, "
          f"step {step_ms:.1f}ms on {jax.devices()[0].platform}")


def memory_report(config, cfg: models.ModelConfig, num_devices: int, limit_gb: float | None) -> str:
  sizes = sharding.mesh_shape(config.mesh, num_devices)
  mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)
  sharding.validate(cfg, mesh, batch_size=config.batch_size, rules=config.get("sharding_rules"))
  plan = memory.plan_memory(config, cfg, sizes)
  lines = [f"mesh: {sizes} ({num_devices} devices), batch {config.batch_size} x {config.seq_len}, "
           f"grad_accum {config.grad_accum_steps}, remat {config.execution.remat_policy}"] + plan.lines()
  limit = limit_gb * memory.GiB if limit_gb else memory.device_memory_bytes()
  memory.check_fits(plan, limit)  # raises with the numbers when it cannot fit
  if limit:
    lines.append(f"fits: {plan.total / memory.GiB:.2f} of {limit / memory.GiB:.1f} GiB per device")
  return "\n".join(lines)


def main(argv):
  del argv
  cfg = models.from_dict(_CONFIG.value.model.to_dict())
  print(report(cfg, _SEQ_LEN.value))
  print(memory_report(_CONFIG.value, cfg, _DEVICES.value or jax.device_count(), _DEVICE_MEMORY_GB.value))
  if _FORWARD.value:
    print(forward_backward(_CONFIG.value, cfg))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
