"""Validation metrics of a model: loss, perplexity, bits-per-byte and per-layer expert load.

  scalars, loads = metrics.evaluate_model(config, model, tokenizer)
  stats = metrics.expert_load_stats(loads)       # {"moe_layers": [{layer, fractions, load_max, ...}], ...}

The language-model numbers are `training.loop.evaluate` itself — the same validation iterator (seed,
seq_len, batch_size, eval_batches from the run config) and the same jitted `make_eval_step` — so
evaluating a checkpoint reproduces the eval its training run logged at that step. Expert loads are
gathered in the same pass: each batch also runs one forward (MTP included when the model has it) that
returns the routed-token counts per expert, `out.aux["expert_load"]` [L, E]. Those counts are routing
decisions, before any capacity dropping, and include the padding of a final, partly filled batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import models
import sharding
from data import tokenizers
from training import loop
from training import step as step_lib
from training.state import TrainState, split_model

from evaluation import restore


def expert_load_stats(loads: dict[str, np.ndarray]) -> dict[str, list[dict]]:
  """Per MoE layer of each stack: the fraction of routed tokens each expert got (sums to 1), the
  max/min load relative to a perfectly balanced one (1.0 = balanced; E·fraction), and the routing
  entropy normalised by log E (1.0 = uniform)."""
  out = {}
  for stack, counts in loads.items():
    rows = np.asarray(counts, np.float64).reshape(-1, np.shape(counts)[-1])  # [L, E]
    layers = []
    for i, row in enumerate(rows):
      e = row.shape[-1]
      frac = row / max(row.sum(), 1.0)
      p = frac[frac > 0]
      layers.append({
          "layer": i,
          "tokens": float(row.sum()),
          "fractions": frac.tolist(),
          "load_max": float(frac.max() * e),
          "load_min": float(frac.min() * e),
          "routing_entropy": float(-(p * np.log(p)).sum() / math.log(e)) if e > 1 else 1.0,
      })
    out[stack] = layers
  return out


def flat_scalars(stats: dict[str, list[dict]]) -> dict[str, float]:
  """`moe/<stack>/layer<i>/{load_max,load_min,routing_entropy}`, as the training metrics name them."""
  out = {}
  for stack, layers in stats.items():
    for layer in layers:
      name = f"moe/{stack}/layer{layer['layer']}" if len(layers) > 1 else f"moe/{stack}"
      for key in ("load_max", "load_min", "routing_entropy"):
        out[f"{name}/{key}"] = layer[key]
  return out


def _make_load_step(modeldef):
  """load_step(state, batch) -> {stack: float32 [L, E] or [E]} routed-token counts."""

  def load_step(state: TrainState, batch: dict):
    model = modeldef.merge(state.params, state.router_bias)
    out = model.forward(batch["tokens"], batch["positions"], batch["segment_ids"],
                        with_mtp=model.cfg.mtp_depth > 0)
    loads = {}
    if "expert_load" in out.aux:
      loads["moe_layers"] = out.aux["expert_load"]
    if out.mtp_aux is not None and "expert_load" in out.mtp_aux:
      loads["mtp"] = out.mtp_aux["expert_load"]
    return loads

  return load_step


class _EvalWithLoads:
  """An eval_step for `loop.evaluate` that also adds up each batch's expert loads (on device)."""

  def __init__(self, eval_step, load_step):
    self.eval_step, self.load_step = eval_step, load_step
    self.loads = None

  def __call__(self, state, batch):
    loads = self.load_step(state, batch)
    self.loads = loads if self.loads is None else jax.tree.map(jnp.add, self.loads, loads)
    return self.eval_step(state, batch)


def evaluate_model(config, model: models.Transformer, tokenizer: tokenizers.Tokenizer, *, mesh=None,
                   expert_loads: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """(eval scalars as training logs them, {stack: summed expert loads}) over the validation batches
  the run config names (`config.eval_batches`; 0 = the whole split)."""
  mesh = restore.eval_mesh(config) if mesh is None else mesh
  modeldef, params, bias = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, router_bias=bias, opt_state=None)
  batch_sharding = sharding.batch_sharding(mesh)
  eval_step = jax.jit(step_lib.make_eval_step(modeldef, tokenizer.token_byte_lengths()))
  step = _EvalWithLoads(eval_step, jax.jit(_make_load_step(modeldef))) if expert_loads else eval_step
  with jax.set_mesh(mesh):
    scalars = loop.evaluate(step, state, config, batch_sharding, tokenizer)
  loads = {} if not expert_loads or step.loads is None else jax.tree.map(np.asarray, jax.device_get(step.loads))
  return scalars, loads
