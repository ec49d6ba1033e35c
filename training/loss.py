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


def shifted_targets(tokens_BT, offset: int, length: int):
  """[B, length]: token t+offset at position t, zeros where t+offset runs past the row. Targets for
  logits of `length` positions, so the loss never slices the [B, T, V] logits: a slice there costs a
  copy forward and a zero-padded [B, T, V] cotangent backward, the largest tensors of a step."""
  targets = tokens_BT[:, offset:]
  return jnp.pad(targets, ((0, 0), (0, length - targets.shape[1])))


def shifted_mask(mask_BT, length: int):
  """A [B, T-offset] target mask padded with False to [B, length]."""
  return jnp.pad(mask_BT, ((0, 0), (0, length - mask_BT.shape[1])))


@jax.custom_vjp
def token_nll(logits_BTV, targets_BT):
  """Per-token negative log-likelihood in float32: logsumexp(logits) − logits[target].

  Its gradient, g·(softmax − onehot(target)), is written as one elementwise expression in the logits'
  dtype. Autodiff of the gather would instead scatter −g into a float32 [B, T, V] buffer and convert
  it afterwards: two more passes over the step's largest tensor, per LM head."""
  nll_BT, _ = _token_nll_fwd(logits_BTV, targets_BT)
  return nll_BT


# Whether `token_nll` reads the logits once for their logsumexp (`logsumexp_one_pass`) instead of twice
# (max, then the sum of exponentials: `jax.nn.logsumexp`, 2 × 2.1 ms of the bench step on an H100).
# Off until a GPU times it (benchmarks.train_step variant `+lse=onepass`).
ONE_PASS_LOGSUMEXP = False


def logsumexp_one_pass(x, axis=-1):
  """logsumexp over the last axis in one read of `x` (float32 arithmetic): a reduction over (running max,
  sum of exp(x − running max)) pairs, rescaling a sum whenever its max grows. Not differentiable (a
  custom reducer); `token_nll` supplies the gradient."""
  if axis not in (-1, x.ndim - 1):
    raise ValueError(f"logsumexp_one_pass reduces the last axis only, got axis={axis}")
  x32 = x.astype(jnp.float32)

  def combine(a, b):
    (m_a, s_a), (m_b, s_b) = a, b
    m = jnp.maximum(m_a, m_b)
    # A side whose max is the new max keeps its sum (also covers −inf on both sides: no inf − inf).
    rescale = lambda m_x, s_x: jnp.where(m_x == m, s_x, s_x * jnp.exp(m_x - m))
    return m, rescale(m_a, s_a) + rescale(m_b, s_b)

  m, s = jax.lax.reduce((x32, jnp.ones_like(x32)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), combine,
                        (x32.ndim - 1,))
  return m + jnp.log(s)


def _token_nll_fwd(logits_BTV, targets_BT):
  logits32_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = (logsumexp_one_pass if ONE_PASS_LOGSUMEXP else jax.nn.logsumexp)(logits32_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits32_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - target_logit_BT, (logits_BTV, targets_BT, logz_BT)


def _token_nll_bwd(residuals, g_BT):
  logits_BTV, targets_BT, logz_BT = residuals
  probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - logz_BT[..., None])
  vocab_BTV = jax.lax.broadcasted_iota(targets_BT.dtype, logits_BTV.shape, logits_BTV.ndim - 1)
  onehot_BTV = targets_BT[..., None] == vocab_BTV
  d_BTV = g_BT[..., None] * (probs_BTV - onehot_BTV.astype(jnp.float32))
  return d_BTV.astype(logits_BTV.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def loss_terms(out: models.ModelOutput, batch: dict, masked: bool = False) -> dict:
  """Sums (not means) of each loss term and the token counts, so microbatches can be accumulated."""
  tokens, length = batch["tokens"], out.logits.shape[1]
  mask = shifted_mask(batch_target_mask(batch, 1, masked), length)
  nll = token_nll(out.logits, shifted_targets(tokens, 1, length))
  terms = {"ce_sum": jnp.sum(jnp.where(mask, nll, 0.0)), "ce_count": jnp.sum(mask).astype(jnp.float32)}
  balance = jnp.sum(out.aux["balance_loss"]) if "balance_loss" in out.aux else jnp.zeros(())
  if out.mtp_logits is not None:
    mtp_length = out.mtp_logits.shape[1]
    mtp_mask = shifted_mask(batch_target_mask(batch, 2, masked), mtp_length)
    mtp_nll = token_nll(out.mtp_logits, shifted_targets(tokens, 2, mtp_length))
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
