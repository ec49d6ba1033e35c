"""DeepSeekMoE router: float32 scores, bias-adjusted group-limited top-k selection.

Selection uses scores + bias (aux-loss-free balancing), but the combine weights use the unbiased
scores. Group-limited routing first keeps the `topk_group` best of `n_group` expert groups, scored by
the sum of each group's top two (V3) or its maximum (V2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import param, precision_for


class RouterBias(nnx.Variable):
  """The aux-loss-free selection bias: updated by a sign rule outside the optimizer, not by gradients."""


class Routing(NamedTuple):
  weights_BTk: jax.Array  # float32 combine weights of the chosen experts
  experts_BTk: jax.Array  # int32 expert ids
  scores_BTE: jax.Array  # float32 unbiased affinities (for the balance loss and statistics)


class Router(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernel = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "expert"), cfg)
    if cfg.router_bias:
      self.bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32),
                             out_sharding=("expert",), eager_sharding=False)
    else:
      self.bias = None

  def logits(self, x_BTD):
    """float32 [B, T, E] router logits."""
    # Always float32 at full precision, whatever the model's dtype: a TF32 or bf16 product would move
    # near-tied scores enough to flip expert choices between backends.
    return jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), self.kernel[...].astype(jnp.float32),
                      precision=precision_for(jnp.float32))

  def __call__(self, x_BTD) -> Routing:
    cfg = self.cfg
    logits_BTE = self.logits(x_BTD)
    if cfg.score_func == "sigmoid":
      scores_BTE = jax.nn.sigmoid(logits_BTE)
    else:
      scores_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    choice_BTE = scores_BTE if self.bias is None else scores_BTE + self.bias[...]
    if cfg.n_group > 1:
      choice_BTE = _keep_best_groups(choice_BTE, cfg)
    _, experts_BTk = jax.lax.top_k(choice_BTE, cfg.num_experts_per_tok)
    weights_BTk = jnp.take_along_axis(scores_BTE, experts_BTk, axis=-1)
    if cfg.norm_topk_prob:
      weights_BTk = weights_BTk / (jnp.sum(weights_BTk, axis=-1, keepdims=True) + 1e-20)
    weights_BTk = weights_BTk * cfg.routed_scaling_factor
    return Routing(weights_BTk, experts_BTk.astype(jnp.int32), scores_BTE)


def _keep_best_groups(choice_BTE, cfg: ModelConfig):
  """Sets the selection score of experts outside the `topk_group` best groups to -inf."""
  *lead, num_experts = choice_BTE.shape
  grouped_BTGe = choice_BTE.reshape(*lead, cfg.n_group, num_experts // cfg.n_group)
  if cfg.group_score == "top2_sum":
    group_BTG = jnp.sum(jax.lax.top_k(grouped_BTGe, 2)[0], axis=-1)
  else:
    group_BTG = jnp.max(grouped_BTGe, axis=-1)
  _, best_BTg = jax.lax.top_k(group_BTG, cfg.topk_group)
  keep_BTG = jnp.any(best_BTg[..., :, None] == jnp.arange(cfg.n_group), axis=-2)
  kept_BTGe = jnp.where(keep_BTG[..., None], grouped_BTGe, -jnp.inf)
  return kept_BTGe.reshape(choice_BTE.shape)


def count_ids(ids, length: int):
  """How many entries of `ids` (int, any shape) equal each of 0 … length-1 → int32 [length]; other ids
  are not counted. A compare-and-sum, which XLA fuses into one reduction, instead of a scatter-add
  (`jnp.bincount`'s, most likely the 2.7 ms scatter kernel of an H200 dropless train step: 98k ids
  onto 64 bins; benchmarks/RESULTS.md)."""
  ids = ids.reshape(-1)
  return jnp.sum(ids[:, None] == jnp.arange(length, dtype=ids.dtype), axis=0, dtype=jnp.int32)


def expert_load(experts_BTk, num_experts: int):
  """Tokens routed to each expert, as float32 counts [E]."""
  return count_ids(experts_BTk, num_experts).astype(jnp.float32)


def sequence_balance_loss(routing: Routing, num_experts: int, top_k: int, segment_mask_BT=None):
  """V3's complementary sequence-wise balance loss Σ_i f_i·P_i, averaged over sequences.

  f_i = E/(k·T) · #tokens of the sequence routed to i;  P_i = mean over tokens of s_i / Σ_j s_j.
  """
  scores_BTE = routing.scores_BTE
  valid_BT = jnp.ones(scores_BTE.shape[:2], jnp.float32) if segment_mask_BT is None else segment_mask_BT
  tokens_B = jnp.maximum(jnp.sum(valid_BT, axis=1), 1.0)
  chosen_BTE = jax.nn.one_hot(routing.experts_BTk, num_experts, dtype=jnp.float32).sum(axis=2)
  per_sequence = lambda x_BTE: jnp.einsum("bte,bt->be", x_BTE, valid_BT, precision=precision_for(jnp.float32))
  f_BE = num_experts / (top_k * tokens_B[:, None]) * per_sequence(chosen_BTE)
  normed_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
  p_BE = per_sequence(normed_BTE) / tokens_B[:, None]
  return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))
