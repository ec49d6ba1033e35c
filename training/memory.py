"""Memory per device for a config × mesh, estimated before anything compiles.

Parameters, gradients and Adam moments are exact (float32 master weights sharded by the rules table);
activations are an estimate of what the backward pass keeps per microbatch, by remat policy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

import models
import sharding

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  params: float  # bytes per device
  grads: float
  optimizer: float
  activations: float  # estimate

  @property
  def total(self) -> float:
    return self.params + self.grads + self.optimizer + self.activations

  def lines(self) -> list[str]:
    return [f"memory_per_device_{k}: {getattr(self, k) / GiB:.3f} GiB"
            for k in ("params", "grads", "optimizer", "activations", "total")]


def _shard_factor(spec, sizes) -> int:
  factor = 1
  for entry in spec:
    for axis in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
      factor *= sizes[axis]
  return factor


def plan_memory(config, model_cfg: models.ModelConfig, mesh_sizes: dict[str, int]) -> MemoryPlan:
  """mesh_sizes: {"data", "fsdp", "expert", "tensor"} → size (no -1; see sharding.mesh_shape)."""
  mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in sharding.AXES), sharding.AXES)
  rules = config.get("sharding_rules")
  model = nnx.eval_shape(lambda: models.Transformer(model_cfg, rngs=nnx.Rngs(0)))
  param_bytes = 0.0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    spec = sharding.logical_to_spec(var.get_metadata()["out_sharding"], rules, shape=value.shape, mesh=mesh)
    param_bytes += math.prod(value.shape) * value.dtype.itemsize / _shard_factor(spec, mesh_sizes)

  tokens = config.batch_size // config.grad_accum_steps * config.seq_len / sharding.batch_shards(mesh_sizes, rules)
  remat = models.execution_from_dict(config.get("execution") or {}).remat_policy
  act = _activation_bytes(model_cfg, tokens, config.seq_len, mesh_sizes["tensor"], remat)
  moment_bytes = jax.numpy.dtype(config.optim.get("moment_dtype", "float32")).itemsize / 4  # per float32 param byte
  return MemoryPlan(params=param_bytes, grads=param_bytes, optimizer=2 * moment_bytes * param_bytes, activations=act)


def _activation_bytes(cfg: models.ModelConfig, tokens: float, seq_len: int, tensor: int, remat_policy: str) -> float:
  """What the backward pass keeps for one microbatch on one device (an estimate)."""
  b = jax.numpy.dtype(cfg.dtype).itemsize
  d, h = cfg.hidden_size, cfg.num_heads / tensor
  q_rank = cfg.q_lora_rank or 0
  attn = tokens * b * (4 * d + q_rank + cfg.kv_lora_rank + h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim))
  attn += tokens * h * seq_len * 4 * 2  # float32 scores and probabilities (XLA reference attention)
  dense_ffn = tokens * b * 3 * cfg.dense_intermediate_size / tensor
  moe_ffn = tokens * b * (cfg.num_experts_per_tok * (2 * d + 3 * cfg.moe_intermediate_size / tensor)
                          + 3 * cfg.n_shared_experts * cfg.moe_intermediate_size / tensor) + tokens * 4 * 3 * cfg.n_routed_experts
  layer_in = tokens * b * d
  per_layer = {"dense": attn + dense_ffn, "moe": attn + moe_ffn}
  n_dense, n_moe = cfg.first_k_dense, cfg.num_moe_layers + cfg.mtp_depth
  if remat_policy == "none":
    kept = n_dense * per_layer["dense"] + n_moe * per_layer["moe"]
  else:  # layer inputs (plus matmul outputs for "dots") and one layer recomputed at a time
    dots = 0.5 if remat_policy == "dots" else 0.0
    kept = (n_dense + n_moe) * layer_in + dots * (n_dense * per_layer["dense"] + n_moe * per_layer["moe"])
    kept += max(per_layer.values())
  logits = tokens * (1 + cfg.mtp_depth) * cfg.vocab_size / tensor * 4 * 2  # float32 logits and their grad
  return kept + logits


def device_memory_bytes() -> float | None:
  """The first device's memory limit, or None where the platform does not say (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - platforms without memory stats
    return None
  return stats.get("bytes_limit")


def check_fits(plan: MemoryPlan, limit: float | None) -> None:
  if limit and plan.total > 0.9 * limit:
    raise ValueError(
        f"this plan needs ~{plan.total / GiB:.1f} GiB per device (params {plan.params / GiB:.1f}, grads "
        f"{plan.grads / GiB:.1f}, Adam {plan.optimizer / GiB:.1f}, activations ~{plan.activations / GiB:.1f}) "
        f"but a device has {limit / GiB:.1f} GiB: use more fsdp/expert/tensor sharding, a smaller batch, "
        f"grad_accum_steps or execution.remat_policy=full")
