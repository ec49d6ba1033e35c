"""The policy-loss math of GRPO (Group Relative Policy Optimization, DeepSeekMath).

For each prompt the rollout samples a *group* of completions; a completion's advantage is its reward
relative to its own group (no learned value function): A = (r - mean_group) / std_group. Each token of a
completion then gets the PPO clipped surrogate with that advantage,

  ratio = pi_new / pi_old = exp(logp_new - logp_old)
  surrogate = min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)

minus a KL penalty to a frozen reference policy, estimated per token with the unbiased, always
non-negative k3 estimator kl = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1. The per-token loss
-(surrogate - beta * kl) is aggregated over completion tokens (`mask`) in one of three ways:

  sequence_mean: mean over rows of each row's token mean (DeepSeekMath; long answers weigh less per token),
  token_mean:    one mean over all tokens of the batch (DAPO),
  dr_grpo:       sum over tokens / (B * T), a constant normaliser with no length bias (Dr. GRPO).

`eps_high > eps` is DAPO's "clip-higher". Inputs are [B, T] per-token log-probs of the sampled tokens,
advantages [B] and a 0/1 mask [B, T]; everything is computed in float32. Rollouts and trainer wiring
live elsewhere: this module is pure, and jit-compatible with the Python scalars as static arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("sequence_mean", "token_mean", "dr_grpo")


def group_advantages(rewards_B, group_size: int, scale: bool = True) -> jax.Array:
  """float32 [B] group-relative advantages; groups are consecutive runs of `group_size` rows.

  A = (r - group mean) / (group std + 1e-6) with the population std, or r - group mean when not `scale`.
  A group whose rewards are all equal carries no signal and gets exactly 0.
  """
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if rewards_B.ndim != 1:
    raise ValueError(f"rewards must be 1-D [B], got shape {rewards_B.shape}")
  if group_size < 2:  # a group of one is its own baseline: its advantage would always be 0
    raise ValueError(f"group_size must be >= 2, got {group_size}")
  B = rewards_B.shape[0]
  if B % group_size:
    raise ValueError(f"batch size {B} is not divisible by group_size {group_size}")
  r_GS = rewards_B.reshape(B // group_size, group_size)
  adv_GS = r_GS - jnp.mean(r_GS, axis=1, keepdims=True)
  if scale:
    adv_GS = adv_GS / (jnp.std(r_GS, axis=1, keepdims=True) + 1e-6)
  # The float mean of equal values need not round back to that value exactly, so zero such groups explicitly.
  flat_G1 = jnp.all(r_GS == r_GS[:, :1], axis=1, keepdims=True)
  return jnp.where(flat_G1, 0.0, adv_GS).reshape(B)


def _check_epsilons(clip_epsilon: float, clip_epsilon_high: float | None) -> float:
  eps_high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
  if not clip_epsilon > 0 or not eps_high > 0:
    raise ValueError(f"clip epsilons must be > 0, got clip_epsilon={clip_epsilon}, "
                     f"clip_epsilon_high={clip_epsilon_high}")
  return eps_high


def _masked(mask_BT, *logps):
  """The bool mask and each log-prob [B, T] in float32 with masked-out entries replaced by 0.

  Padding positions may hold garbage (huge or inf log-probs); exp() of those would be inf and inf * 0 is
  NaN in both the value and the gradient. Selecting with `where` before any arithmetic keeps both finite,
  and the gradient of `where` to the unselected branch is exactly 0.
  """
  valid_BT = jnp.asarray(mask_BT) > 0
  return valid_BT, [None if x is None else jnp.where(valid_BT, jnp.asarray(x, jnp.float32), 0.0) for x in logps]


def _k3(logp_ref_BT, logp_new_BT):
  """Per-token k3 estimate of KL(pi_new || pi_ref): unbiased, >= 0, and low-variance near pi_new = pi_ref."""
  log_r_BT = logp_ref_BT - logp_new_BT
  return jnp.exp(log_r_BT) - log_r_BT - 1.0


def grpo_loss(logp_new, logp_old, logp_ref, advantages, mask, *, clip_epsilon: float,
              clip_epsilon_high: float | None = None, kl_beta: float, aggregation: str = "sequence_mean"):
  """Scalar GRPO loss (to minimise) of [B, T] token log-probs; `logp_ref` may be None when kl_beta == 0."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  eps_high = _check_epsilons(clip_epsilon, clip_epsilon_high)
  if kl_beta < 0:
    raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
  if kl_beta > 0 and logp_ref is None:
    raise ValueError("kl_beta > 0 needs logp_ref")
  valid_BT, (new_BT, old_BT, ref_BT) = _masked(mask, logp_new, logp_old, logp_ref if kl_beta > 0 else None)
  adv_B1 = jnp.asarray(advantages, jnp.float32)[:, None]
  ratio_BT = jnp.exp(new_BT - old_BT)
  surrogate_BT = jnp.minimum(ratio_BT * adv_B1, jnp.clip(ratio_BT, 1.0 - clip_epsilon, 1.0 + eps_high) * adv_B1)
  objective_BT = surrogate_BT - kl_beta * _k3(ref_BT, new_BT) if kl_beta > 0 else surrogate_BT
  loss_BT = jnp.where(valid_BT, -objective_BT, 0.0)
  count_BT = valid_BT.astype(jnp.float32)
  B, T = loss_BT.shape
  if aggregation == "sequence_mean":
    # max(., 1): a row with no completion tokens contributes 0 (its sum is 0), not 0/0.
    row_B = jnp.sum(loss_BT, axis=1) / jnp.maximum(jnp.sum(count_BT, axis=1), 1.0)
    return jnp.mean(row_B)
  if aggregation == "token_mean":
    return jnp.sum(loss_BT) / jnp.maximum(jnp.sum(count_BT), 1.0)
  return jnp.sum(loss_BT) / (B * T)


def policy_metrics(logp_new, logp_old, logp_ref, advantages, mask, *, clip_epsilon: float,
                   clip_epsilon_high: float | None = None) -> dict:
  """Scalar float32 diagnostics over masked tokens: `clip_fraction` (tokens where clipping changed the
  objective, i.e. the clipped term won the min), `kl` (mean k3; 0 without a reference) and `ratio_mean`."""
  eps_high = _check_epsilons(clip_epsilon, clip_epsilon_high)
  valid_BT, (new_BT, old_BT, ref_BT) = _masked(mask, logp_new, logp_old, logp_ref)
  adv_B1 = jnp.asarray(advantages, jnp.float32)[:, None]
  count = jnp.maximum(jnp.sum(valid_BT.astype(jnp.float32)), 1.0)
  masked_mean = lambda x_BT: jnp.sum(jnp.where(valid_BT, x_BT, 0.0)) / count
  ratio_BT = jnp.exp(new_BT - old_BT)
  clipped_BT = ((adv_B1 > 0) & (ratio_BT > 1.0 + eps_high)) | ((adv_B1 < 0) & (ratio_BT < 1.0 - clip_epsilon))
  kl = jnp.zeros((), jnp.float32) if ref_BT is None else masked_mean(_k3(ref_BT, new_BT))
  return {"clip_fraction": masked_mean(clipped_BT.astype(jnp.float32)), "kl": kl,
          "ratio_mean": masked_mean(ratio_BT)}
