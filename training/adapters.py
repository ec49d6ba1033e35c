"""LoRA in the trainer: the run config's `lora` section, the adapters' layout on the mesh, and the
weights a step runs the model with.

`config.lora.rank` > 0 makes a run train LoRA adapters (models/lora.py) on the frozen weights of its
`init_from`: `TrainState.params` holds only the adapters (what the optimizer and the checkpoint see),
`TrainState.base_params` the frozen base, which is never checkpointed (the run's config.json records
where it comes from).
"""

from __future__ import annotations

import jax

import sharding
from models import lora


def lora_config(config) -> lora.LoraConfig | None:
  """The run's LoraConfig, or None when `config.lora.rank` is 0 or the section is absent."""
  section = config.get("lora")
  if not section or not section.get("rank"):
    return None
  return lora.LoraConfig.from_dict(section)


def b_lr_ratio(config) -> float:
  """LoRA+'s learning-rate multiple for the B matrices (1 = plain LoRA, and for runs without LoRA)."""
  return float(config.lora.get("b_lr_ratio", 1.0)) if lora_config(config) is not None else 1.0


def abstract_adapters(plan, mesh=None, rules=None) -> dict:
  """ShapeDtypeStructs of `lora.init_adapters(plan, ...)`, with their NamedShardings when `mesh` is given
  (each adapter is split like the weight it adapts; the rank axis is whole)."""
  shapes = jax.eval_shape(lambda: lora.init_adapters(plan, jax.random.key(0)))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      adapter_shardings(plan, mesh, rules))


def adapter_shardings(plan, mesh, rules=None) -> dict:
  """NamedShardings of the adapters from their logical axes (`lora.adapter_axes`) under the rules."""
  shapes = jax.eval_shape(lambda: lora.init_adapters(plan, jax.random.key(0)))
  axes = lora.adapter_axes(plan)
  return jax.tree.map(lambda names, a: sharding.named_sharding(mesh, names, rules, shape=a.shape), axes, shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def model_params(params: dict, base_params: dict, lora_cfg: lora.LoraConfig | None, dropout_rng=None) -> dict:
  """The full parameter dict the model runs with: `params` itself, or base + scale·A·B for a LoRA run."""
  if lora_cfg is None:
    return params
  return lora.apply(base_params, params, lora_cfg, dropout_rng=dropout_rng)
