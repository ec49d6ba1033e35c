"""DeepSeekMoE: shared experts plus fine-grained routed experts with two matmul backends.

- "dropless": sort the N·k assignments by expert and run grouped matmuls (`jax.lax.ragged_dot`), so
  no token is ever dropped.
- "capacity": scatter assignments into a fixed [E, C, D] buffer (C slots per expert, first come first
  served in token order), batched einsum, gather back; assignments beyond capacity are dropped.
With ample capacity the two agree exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, param
from models.router import Router, Routing, expert_load, sequence_balance_loss


class RoutedExperts(nnx.Module):
  """E independent SwiGLU experts stored as stacked [E, ...] weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.cfg = cfg
    self.gate = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.up = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg)
    self.down = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg)

  def __call__(self, x_ND, routing: Routing):
    """x [N, D] with routing over the same N tokens (leading dims flattened) → [N, D]."""
    k = self.cfg.num_experts_per_tok
    experts_A = routing.experts_BTk.reshape(-1)
    weights_A = routing.weights_BTk.reshape(-1)
    tokens_A = jnp.arange(experts_A.shape[0], dtype=jnp.int32) // k
    if self.cfg.moe_backend == "dropless":
      y_AD = self._dropless(x_ND, experts_A, tokens_A)
    else:
      y_AD = self._capacity(x_ND, experts_A, tokens_A)
    y_AD = y_AD.astype(jnp.float32) * weights_A[:, None]
    return jnp.zeros(x_ND.shape, jnp.float32).at[tokens_A].add(y_AD).astype(x_ND.dtype)

  def _ffn_grouped(self, x_AD, group_sizes_E):
    dt = self.cfg.dtype
    ragged = lambda x, w: jax.lax.ragged_dot(x.astype(dt), w.astype(dt), group_sizes_E,
                                            preferred_element_type=jnp.float32).astype(dt)
    h_AF = jax.nn.silu(ragged(x_AD, self.gate[...])) * ragged(x_AD, self.up[...])
    return ragged(h_AF, self.down[...])

  def _dropless(self, x_ND, experts_A, tokens_A):
    order_A = jnp.argsort(experts_A, stable=True)
    group_sizes_E = jnp.bincount(experts_A, length=self.cfg.n_routed_experts).astype(jnp.int32)
    y_sorted_AD = self._ffn_grouped(x_ND[tokens_A[order_A]], group_sizes_E)
    return jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)

  def _capacity(self, x_ND, experts_A, tokens_A):
    cfg = self.cfg
    e = cfg.n_routed_experts
    capacity = max(1, math.ceil(cfg.capacity_factor * experts_A.shape[0] / e))
    one_hot_AE = jax.nn.one_hot(experts_A, e, dtype=jnp.int32)
    slot_A = jnp.sum((jnp.cumsum(one_hot_AE, axis=0) - 1) * one_hot_AE, axis=-1)
    kept_A = slot_A < capacity
    flat_slot_A = jnp.where(kept_A, experts_A * capacity + slot_A, e * capacity)  # dropped → out of range
    buf_ECD = (jnp.zeros((e * capacity, x_ND.shape[-1]), cfg.dtype)
               .at[flat_slot_A].set(x_ND[tokens_A].astype(cfg.dtype), mode="drop")
               .reshape(e, capacity, -1))
    mm = lambda spec, a, w: jnp.einsum(spec, a, w.astype(cfg.dtype),
                                       preferred_element_type=jnp.float32).astype(cfg.dtype)
    h_ECF = jax.nn.silu(mm("ecd,edf->ecf", buf_ECD, self.gate[...])) * mm("ecd,edf->ecf", buf_ECD, self.up[...])
    y_ECD = mm("ecf,efd->ecd", h_ECF, self.down[...])
    y_AD = y_ECD.reshape(e * capacity, -1).at[flat_slot_A].get(mode="fill", fill_value=0)
    return jnp.where(kept_A[:, None], y_AD, 0)


class MoE(nnx.Module):
  """Routed experts + shared experts. Returns (output, aux) where aux holds load and balance loss."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.router = Router(cfg, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    self.shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size, rngs=rngs) \
        if cfg.n_shared_experts else None

  def __call__(self, x_BTD, valid_BT=None):
    cfg = self.cfg
    b, t, d = x_BTD.shape
    routing = self.router(x_BTD)
    y_BTD = self.experts(x_BTD.reshape(b * t, d), routing).reshape(b, t, d)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    aux = {
        "expert_load": expert_load(routing.experts_BTk, cfg.n_routed_experts),
        "balance_loss": sequence_balance_loss(routing, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                              valid_BT),
    }
    return y_BTD, aux
