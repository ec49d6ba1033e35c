"""DeepSeekMoE: shared experts plus fine-grained routed experts with two matmul backends.

- "dropless": sort the N·k assignments by expert and run grouped matmuls (`jax.lax.ragged_dot`), so
  no token is ever dropped.
- "capacity": place assignments in a fixed [E, C, D] buffer (C slots per expert, first come first
  served in token order), batched einsum, take the rows back; assignments beyond capacity are dropped.
  Both moves are gathers, in the forward and the backward pass (`permute_rows`).
With ample capacity the two agree exactly. Under an ambient mesh (`jax.set_mesh`) whose "expert" axis
is > 1, routing and routed experts run expert-parallel (all_to_all dispatch) in sharding/expert_parallel.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, matmul, param
from models.router import Router, Routing, expert_load, sequence_balance_loss


class RoutedExperts(nnx.Module):
  """E independent SwiGLU experts stored as stacked [E, ...] weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.cfg = cfg
    self.gate = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.up = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.down = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg)

  def weights(self):
    return self.gate[...], self.up[...], self.down[...]

  def __call__(self, x_ND, routing: Routing):
    """x [N, D] with routing over the same N tokens (leading dims flattened) → [N, D]."""
    k = self.cfg.num_experts_per_tok
    experts_A = routing.experts_BTk.reshape(-1)
    y_AD = expert_ffn(self.cfg, self.weights(), assignment_rows(x_ND, k), experts_A)
    return combine(y_AD, routing.weights_BTk.reshape(-1), k).astype(x_ND.dtype)


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


def expert_ffn(cfg: ModelConfig, weights, x_AD, experts_A):
  """Row a = expert experts_A[a] applied to x_AD[a] → [A, D].

  weights = (gate [E', D, F'], up [E', D, F'], down [E', F', D]) may be a slice of the experts (an
  expert-parallel shard: E' local experts, F' a tensor shard of F); ids ≥ E' mark padding rows → 0.
  """
  backend = _dropless if cfg.moe_backend == "dropless" else _capacity
  return backend(cfg, weights, x_AD, experts_A)


def _dropless(cfg, weights, x_AD, experts_A):
  gate, up, down = weights
  e = gate.shape[0]
  order_A = jnp.argsort(experts_A, stable=True)  # padding ids (≥ e) sort last, outside every group
  group_sizes_E = jnp.bincount(experts_A, length=e).astype(jnp.int32)
  ragged = lambda x, w: jax.lax.ragged_dot(x.astype(cfg.dtype), w.astype(cfg.dtype), group_sizes_E,
                                          preferred_element_type=jnp.float32).astype(cfg.dtype)
  x_sorted_AD = x_AD[order_A]
  y_sorted_AD = ragged(jax.nn.silu(ragged(x_sorted_AD, gate)) * ragged(x_sorted_AD, up), down)
  y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
  return jnp.where((experts_A < e)[:, None], y_AD, 0)


def _capacity(cfg, weights, x_AD, experts_A):
  gate, up, down = weights
  e = gate.shape[0]
  # Slots per expert = ceil(cf · rows / E): with all E experts local this is cf × the balanced load;
  # an expert-parallel shard sees (expert-axis size)× the local rows for E/(axis size) experts.
  capacity = max(1, math.ceil(cfg.capacity_factor * experts_A.shape[0] / cfg.n_routed_experts))
  one_hot_AE = jax.nn.one_hot(experts_A, e, dtype=jnp.int32)
  slot_A = jnp.sum((jnp.cumsum(one_hot_AE, axis=0) - 1) * one_hot_AE, axis=-1)
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


class MoE(nnx.Module):
  """Routed experts + shared experts. Returns (output, aux) where aux holds load and balance loss."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.router = Router(cfg, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    # With no shared experts but MLP biases, transformers' V2 still adds a width-0 shared MLP whose
    # output bias is live; a width-0 MLP reproduces that exactly.
    self.shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size, rngs=rngs) \
        if cfg.n_shared_experts or cfg.mlp_bias else None

  def __call__(self, x_BTD, valid_BT=None):
    mesh = _expert_parallel_mesh()
    if mesh is not None:
      from sharding import expert_parallel  # lazy: importing models never imports sharding
      y_BTD, aux = expert_parallel.routed_moe(self.router, self.experts, x_BTD, valid_BT, mesh)
    else:
      y_BTD, aux = self._routed(x_BTD, valid_BT)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    return y_BTD, aux

  def _routed(self, x_BTD, valid_BT):
    cfg = self.cfg
    b, t, d = x_BTD.shape
    routing = self.router(x_BTD)
    y_BTD = self.experts(x_BTD.reshape(b * t, d), routing).reshape(b, t, d)
    aux = {
        "expert_load": expert_load(routing.experts_BTk, cfg.n_routed_experts),
        "balance_loss": sequence_balance_loss(routing, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                              valid_BT),
    }
    return y_BTD, aux


def _expert_parallel_mesh():
  """The ambient mesh (`jax.set_mesh`) when it splits experts and we are not inside a shard_map."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get("expert", 1) == 1:
    return None
  if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
    return None
  return mesh
