"""Routed experts and the token moves around them, with two matmul backends.

- dropless (`capacity=None`): sort the N·k assignments by expert and run grouped matmuls
  (models/grouped_matmul.py: `jax.lax.ragged_dot`, or tokamax's GPU kernel), so no token is ever
  dropped. Gate and up run as one grouped matmul against [E, D, 2F] (concatenated in the step; the
  parameters stay separate, as checkpoints and HF store them).
- capacity (`capacity=C`): place assignments in a fixed [E, C, D] buffer (C slots per expert, first
  come first served in assignment order), batched einsum, take the rows back; assignments beyond C are
  dropped.
In both, the moves are gathers in the forward and the backward pass (`permute_rows`). With C ≥ the
busiest expert's load the two agree exactly. models/moe.py picks the backend from the `Execution`;
models/moe_parallel.py runs the same experts on each expert-parallel shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import quantized
from models.config import ModelConfig
from models.grouped_matmul import grouped_matmul
from models.layers import matmul, param
from models.router import count_ids


class RoutedExperts(nnx.Module):
  """E independent SwiGLU experts stored as stacked [E, ...] weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.cfg = cfg
    self.gate = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.up = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.down = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg)

  def weights(self):
    """(gate, up, down) as stored; int8-quantized ones (inference) in the compute dtype."""
    return tuple(quantized.dequantize(w[...], self.cfg.dtype) for w in (self.gate, self.up, self.down))

  def __call__(self, x_ND, experts_A, weights_A, capacity: int | None = None, grouped: str = "xla"):
    """x [N, D]; the N·k assignments' expert ids and combine weights (token-major) → [N, D] in x's
    dtype. capacity: None (dropless) or slots per expert; grouped: the dropless grouped matmul."""
    k = experts_A.shape[0] // x_ND.shape[0]
    y_AD = expert_ffn(self.cfg, self.weights(), assignment_rows(x_ND, k), experts_A, capacity, grouped)
    return combine(y_AD, weights_A, k).astype(x_ND.dtype)


# Assignment a = n·k + j is token n's j-th expert choice. With that order, copying tokens to their
# assignments is a repeat and summing them back a reshape: no gather or scatter, and their gradients
# are each other (a scatter-add of [N·k, D] float32 rows cost ~10 ms of an H100 train step).
def assignment_rows(x_ND, k: int):
  """[N, D] → [N·k, D]: row a is token a // k."""
  return jnp.repeat(x_ND, k, axis=0)


def combine(y_AD, weights_A, k: int):
  """Σ over each token's k assignments of weight · expert output, float32 [N, D]."""
  y_AD = y_AD.astype(jnp.float32) * weights_A[:, None]
  return y_AD.reshape(-1, k, y_AD.shape[-1]).sum(axis=1)


def expert_ffn(cfg: ModelConfig, weights, x_AD, experts_A, capacity: int | None = None,
               grouped: str = "xla"):
  """Row a = expert experts_A[a] applied to x_AD[a] → [A, D].

  weights = (gate [E', D, F'], up [E', D, F'], down [E', F', D]) may be a slice of the experts (an
  expert-parallel shard: E' local experts, F' a tensor shard of F); ids ≥ E' mark padding rows → 0.
  capacity: None runs dropless with the grouped matmul `grouped` (Execution.grouped_matmul); an int C
  keeps the first C assignments of each expert (the rest → 0).
  """
  if capacity is None:
    return _dropless(cfg, weights, x_AD, experts_A, grouped)
  return _capacity(cfg, weights, x_AD, experts_A, capacity)


def expert_capacity(capacity_factor: float, num_assignments: int, num_experts: int) -> int:
  """Slots per expert: capacity_factor × the balanced load, at least one."""
  return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def arrival_order(ids_A, num_ids: int, offset_I=None):
  """How many earlier rows carry the same id, plus offset_I[id] when given → int32 [A]: each row's
  first-come-first-served slot. Rows whose id is outside [0, num_ids) get 0."""
  one_hot_AI = jax.nn.one_hot(ids_A, num_ids, dtype=jnp.int32)  # out-of-range ids → all zeros
  earlier_AI = jnp.cumsum(one_hot_AI, axis=0) - 1
  if offset_I is not None:
    earlier_AI = earlier_AI + offset_I
  return jnp.sum(earlier_AI * one_hot_AI, axis=-1)


# Assignment counts up to which `sort_by_expert` sorts by counting: generation's steps (a decode step of
# the bench model at batch 64 has 384), where the argsort and the scatters cost a kernel each; its
# [A, A] match costs A² compares, nothing next to a training step's 98k-assignment argsort.
COUNTING_SORT_MAX = 2048


def sort_by_expert(experts_A, num_experts: int):
  """The dropless layout: (group_sizes int32 [E], source_S, position_A).

  Sorted row s holds assignment source_S[s]; assignment a sits at sorted row position_A[a]. The
  assignments of expert e fill rows [Σ sizes[:e], Σ sizes[:e+1]) in assignment order; padding ids
  (≥ E) belong to no group: their position is A (out of range) and the rows past the groups have
  source A, so `permute_rows` reads nothing for them either way."""
  a = experts_A.shape[0]
  if a <= COUNTING_SORT_MAX:
    return _sort_by_counting(experts_A, num_experts)
  group_sizes_E = count_ids(experts_A, num_experts)  # ids ≥ E not counted
  sorted_S = jnp.argsort(experts_A, stable=True).astype(jnp.int32)  # padding last
  rows = jnp.arange(a, dtype=jnp.int32)
  source_S = jnp.where(rows < jnp.sum(group_sizes_E), sorted_S, a)
  position_A = jnp.zeros((a,), jnp.int32).at[sorted_S].set(rows)
  position_A = jnp.where(experts_A < num_experts, position_A, a)
  return group_sizes_E, source_S, position_A


def _sort_by_counting(experts_A, num_experts: int):
  """`sort_by_expert` without a sort or a scatter, for a few assignments: an assignment's row is its
  expert's first row plus how many earlier assignments chose that expert (`arrival_order`), and
  source_S inverts position_A by matching every row with every assignment."""
  a = experts_A.shape[0]
  group_sizes_E = count_ids(experts_A, num_experts)
  starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  position_A = jnp.where(experts_A < num_experts, arrival_order(experts_A, num_experts, starts_E), a)
  return group_sizes_E, invert_positions(position_A), position_A


def invert_positions(position_A):
  """source_S of a dropless layout from its position_A (out-of-range positions: no row): sorted row s
  reads the assignment placed there, A where none is; one [A, A] match, for a few assignments."""
  a = position_A.shape[0]
  rows = jnp.arange(a, dtype=jnp.int32)
  return jnp.min(jnp.where(position_A[None, :] == rows[:, None], rows[None, :], a), axis=1)


def _dropless(cfg, weights, x_AD, experts_A, grouped: str):
  gate, up, down = weights
  e, _, f = gate.shape
  group_sizes_E, source_S, position_A = sort_by_expert(experts_A, e)
  gmm = lambda x, w: grouped_matmul(x, w, group_sizes_E, grouped, cfg.dtype)
  x_SD = permute_rows(x_AD.astype(cfg.dtype), source_S, position_A)
  # One grouped matmul for gate and up: the weights concatenate as the step casts them to the compute
  # dtype, and the gradient splits the same way.
  gate_up_S2F = gmm(x_SD, jnp.concatenate([gate.astype(cfg.dtype), up.astype(cfg.dtype)], axis=-1))
  # Rows past the groups (expert-parallel padding) may hold garbage from a GPU kernel: zero them before
  # the activation (the select fuses with it), so neither they nor their gradients reach a weight
  # gradient; `permute_rows` reads none of them.
  gate_up_S2F = jnp.where((source_S < x_AD.shape[0])[:, None], gate_up_S2F, 0)
  h_SF = jax.nn.silu(gate_up_S2F[:, :f]) * gate_up_S2F[:, f:]
  return permute_rows(gmm(h_SF, down), position_A, source_S)


def _capacity(cfg, weights, x_AD, experts_A, capacity: int):
  gate, up, down = weights
  e = gate.shape[0]
  slot_A = arrival_order(experts_A, e)
  kept_A = (slot_A < capacity) & (experts_A < e)
  slots = e * capacity
  flat_slot_A = jnp.where(kept_A, experts_A * capacity + slot_A, slots)  # dropped → out of range
  # The inverse map, slot → assignment (num assignments = empty slot): dispatch and combine are then
  # both gathers, and so are their gradients (permute_rows).
  source_S = jnp.full((slots + 1,), experts_A.shape[0], jnp.int32).at[flat_slot_A].set(
      jnp.arange(experts_A.shape[0], dtype=jnp.int32))[:slots]
  buf_ECD = permute_rows(x_AD.astype(cfg.dtype), source_S, flat_slot_A).reshape(e, capacity, -1)
  mm = lambda spec, a, w: matmul(a, w, cfg, spec)
  h_ECF = jax.nn.silu(mm("ecd,edf->ecf", buf_ECD, gate)) * mm("ecd,edf->ecf", buf_ECD, up)
  y_ECD = mm("ecf,efd->ecd", h_ECF, down)
  return permute_rows(y_ECD.reshape(slots, -1), flat_slot_A, source_S)


@jax.custom_vjp
def permute_rows(x_ID, index_O, inverse_I):
  """out[o] = x[index[o]], 0 where index[o] is out of range; index must be injective on its in-range
  entries and `inverse` its inverse (inverse[index[o]] = o, out of range elsewhere). The gradient is
  then the gather g[inverse] instead of the scatter-add autodiff would make (scatters of [A, D] rows
  cost ~12 ms of an H100 train step)."""
  return x_ID.at[index_O].get(mode="fill", fill_value=0)


def _permute_rows_fwd(x_ID, index_O, inverse_I):
  return permute_rows(x_ID, index_O, inverse_I), (index_O, inverse_I)


def _permute_rows_bwd(residuals, g_OD):
  index_O, inverse_I = residuals
  zero_index = lambda i: np.zeros(i.shape, jax.dtypes.float0)  # integer inputs take float0 cotangents
  return g_OD.at[inverse_I].get(mode="fill", fill_value=0), zero_index(index_O), zero_index(inverse_I)


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)
