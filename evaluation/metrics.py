"""Validation metrics of a model: loss, perplexity, bits-per-byte and per-layer expert load.

  scalars, loads = metrics.evaluate_model(config, model, tokenizer)
  stats = metrics.expert_load_stats(loads)       # {"moe_layers": [{layer, fractions, load_max, ...}], ...}

Everything comes from `training.eval` — the same validation iterator (seed, seq_len, batch_size,
eval_batches from the run config) and the same jitted eval step, one forward per batch — so evaluating
a checkpoint reproduces the eval its training run logged at that step. Expert loads are routed-token
counts per expert, `ModelOutput.expert_loads()` [L, E]: routing decisions, before any capacity
dropping, including the padding of a final, partly filled batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import models
import sharding
from data import tokenizers
from training import eval as eval_lib
from training import metrics as training_metrics
from training import step as step_lib
from training.state import TrainState, split_model

from evaluation import restore


def expert_load_stats(loads: dict[str, np.ndarray]) -> dict[str, list[dict]]:
  """{stack: per-layer stats} (training.metrics.expert_load_stats: fractions, load_max/min relative to a
  balanced load, normalised routing entropy)."""
  return {stack: training_metrics.expert_load_stats(counts) for stack, counts in loads.items()}


def flat_scalars(loads: dict[str, np.ndarray]) -> dict[str, float]:
  """`moe/<stack>/layer<i>/{load_max,load_min,routing_entropy}`, named as the training metrics are."""
  out = {}
  for stack, counts in loads.items():
    out.update(training_metrics.load_scalars(f"moe/{stack}", counts))
  return out


def evaluate_model(config, model: models.Transformer, tokenizer: tokenizers.Tokenizer, *, mesh=None
                   ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """(eval scalars as training logs them, {stack: summed expert loads}) over the validation batches
  the run config names (`config.eval_batches`; 0 = the whole split)."""
  mesh = restore.eval_mesh(config) if mesh is None else mesh
  execution = restore.eval_execution(config, mesh)
  modeldef, params, bias = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, router_bias=bias, opt_state=None)
  batch_sharding = sharding.batch_sharding(mesh, config.get("sharding_rules"))
  eval_step = jax.jit(eval_lib.make_eval_step(modeldef, tokenizer.token_byte_lengths(), execution,
                                              masked=step_lib.is_masked(config)))
  return eval_lib.evaluate(eval_step, state, config, batch_sharding)
