"""The eval step and loop: loss, bits/byte, MTP loss and expert loads from one forward per batch.

Training's periodic eval and eval.py (evaluation/metrics.py) both run this, so evaluating a checkpoint
reproduces the eval its training run logged at that step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import models
from data import pipeline
from training import adapters
from training import loss as loss_lib
from training.state import ModelDef, TrainState
from training.step import forward


def make_eval_step(modeldef: ModelDef, token_bytes, execution: models.Execution | None = None, *,
                   masked: bool = False, lora_cfg=None):
  """eval_step(state, batch) → (sums, loads): sums of next-token NLL (nats), target bytes and targets
  (and of the MTP NLL and targets when the model has MTP); loads = `ModelOutput.expert_loads()`,
  the routed-token counts per MoE stack (routing decisions, before any capacity dropping). masked:
  only the batch's `loss_mask` tokens are targets (supervised fine-tuning); lora_cfg: `state.params`
  holds LoRA adapters over `state.base_params`."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)
  execution = models.Execution() if execution is None else execution
  with_mtp = modeldef.cfg.mtp_depth > 0

  def eval_step(state: TrainState, batch: dict):
    params = adapters.model_params(state.params, state.base_params, lora_cfg)
    out = forward(modeldef, params, state.router_bias, batch, with_mtp=with_mtp, execution=execution)
    length = out.logits.shape[1]  # targets shifted to the logits, as the loss does: no [B, T, V] slice
    mask = loss_lib.shifted_mask(loss_lib.batch_target_mask(batch, 1, masked), length)
    targets = loss_lib.shifted_targets(batch["tokens"], 1, length)
    nll = loss_lib.token_nll(out.logits, targets)
    sums = {"nll_sum": jnp.sum(jnp.where(mask, nll, 0.0)),
            "bytes": jnp.sum(jnp.where(mask, token_bytes[targets], 0.0)),
            "count": jnp.sum(mask).astype(jnp.float32)}
    if with_mtp:
      mtp_length = out.mtp_logits.shape[1]
      mtp_mask = loss_lib.shifted_mask(loss_lib.batch_target_mask(batch, 2, masked), mtp_length)
      mtp_nll = loss_lib.token_nll(out.mtp_logits, loss_lib.shifted_targets(batch["tokens"], 2, mtp_length))
      sums["mtp_nll_sum"] = jnp.sum(jnp.where(mtp_mask, mtp_nll, 0.0))
      sums["mtp_count"] = jnp.sum(mtp_mask).astype(jnp.float32)
    return sums, out.expert_loads()

  return eval_step


def global_batch(local: dict, batch_sharding) -> dict:
  """This process's rows of a batch → global jax Arrays laid out by `batch_sharding`."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in local.items()}


def evaluate(eval_step, state, config, batch_sharding) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """(scalars, loads) over the first `config.eval_batches` validation batches (0 = the whole split):
  eval/loss, perplexity, bits_per_byte, tokens (and mtp_loss), and the summed expert loads
  {stack: [L, E] or [E]} of those batches (a final partly filled batch's padding included)."""
  it = pipeline.make_iterator(config.data, split="validation", seq_len=config.seq_len,
                              global_batch_size=config.batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count(), seed=config.seed, num_epochs=1)
  totals = None
  for i, local in enumerate(it):
    if config.eval_batches and i >= config.eval_batches:
      break
    out = eval_step(state, global_batch(local, batch_sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError("the validation split produced no batches")
  sums, loads = jax.device_get(totals)
  sums = {k: float(v) for k, v in sums.items()}
  loss = sums["nll_sum"] / max(sums["count"], 1.0)
  scalars = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
             "eval/bits_per_byte": sums["nll_sum"] / max(sums["bytes"], 1.0) / math.log(2),
             "eval/tokens": sums["count"]}
  if "mtp_nll_sum" in sums:
    scalars["eval/mtp_loss"] = sums["mtp_nll_sum"] / max(sums["mtp_count"], 1.0)
  return scalars, {stack: np.asarray(load) for stack, load in loads.items()}
