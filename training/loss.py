"""Next-token cross-entropy on packed rows, the MTP loss and the balance loss.

Batches hold packed documents: `tokens`, `segment_ids` (0 = padding) and `positions` [B, T]. A target
at t+d counts only if it lies in the same document as the input at t. Supervised fine-tuning batches
also hold `loss_mask` [B, T] (1 on completion / assistant tokens): with `masked=True` only those tokens
are targets, so the prompt's tokens are neither counted nor differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import models


def target_mask(segment_ids_BT, offset: int, loss_mask_BT=None):
  """[B, T-offset]: whether token t+offset is a valid target for the prediction made at t (and, with
  a loss mask, one to train on)."""
  src, dst = segment_ids_BT[:, :-offset], segment_ids_BT[:, offset:]
  mask = (src == dst) & (dst > 0)
  return mask if loss_mask_BT is None else mask & (loss_mask_BT[:, offset:] > 0)


def batch_target_mask(batch: dict, offset: int, masked: bool):
  """`target_mask` of a batch; `masked` applies its `loss_mask` (supervised fine-tuning)."""
  return target_mask(batch["segment_ids"], offset, batch["loss_mask"] if masked else None)


def token_nll(logits_BTV, targets_BT):
  """Per-token negative log-likelihood in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - target_logit_BT


def loss_terms(out: models.ModelOutput, batch: dict, masked: bool = False) -> dict:
  """Sums (not means) of each loss term and the token counts, so microbatches can be accumulated."""
  tokens = batch["tokens"]
  mask = batch_target_mask(batch, 1, masked)
  nll = token_nll(out.logits[:, :-1], tokens[:, 1:])
  terms = {"ce_sum": jnp.sum(jnp.where(mask, nll, 0.0)), "ce_count": jnp.sum(mask).astype(jnp.float32)}
  balance = jnp.sum(out.aux["balance_loss"]) if "balance_loss" in out.aux else jnp.zeros(())
  if out.mtp_logits is not None:
    mtp_mask = batch_target_mask(batch, 2, masked)
    mtp_nll = token_nll(out.mtp_logits[:, :-1], tokens[:, 2:])
    terms["mtp_sum"] = jnp.sum(jnp.where(mtp_mask, mtp_nll, 0.0))
    terms["mtp_count"] = jnp.sum(mtp_mask).astype(jnp.float32)
    balance = balance + jnp.sum(out.mtp_aux["balance_loss"])
  terms["balance"] = balance
  return terms


def step_counts(batch: dict, with_mtp: bool, masked: bool = False) -> dict:
  """Target counts of a whole step's batch, fixed before the microbatch loop so sums add up exactly."""
  counts = {"ce_count": jnp.sum(batch_target_mask(batch, 1, masked)).astype(jnp.float32)}
  if with_mtp:
    counts["mtp_count"] = jnp.sum(batch_target_mask(batch, 2, masked)).astype(jnp.float32)
  return counts


def combine(terms: dict, counts: dict, num_microbatches: int, *, alpha: float, mtp_lambda: float):
  """Total loss from summed terms over the whole step's counts; the balance loss is averaged."""
  loss = terms["ce_sum"] / jnp.maximum(counts["ce_count"], 1.0)
  if "mtp_sum" in terms:
    loss = loss + mtp_lambda * terms["mtp_sum"] / jnp.maximum(counts["mtp_count"], 1.0)
  return loss + alpha * terms["balance"] / num_microbatches
