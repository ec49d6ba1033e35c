"""DeepSeekMoE: shared experts plus fine-grained routed experts.

How the routed experts run is the caller's `Execution`: the matmul backend (dropless grouped matmul,
or a capacity buffer that drops what overflows; models/experts.py) and, when `execution.expert_parallel`
is set, expert-parallel dispatch over its mesh (models/moe_parallel.py). Nothing here looks at an
ambient mesh: without `expert_parallel` the experts run as ordinary (GSPMD-sharded) arrays.
"""

from __future__ import annotations

from flax import nnx

from models import moe_parallel
from models.config import ModelConfig
from models.execution import Execution
from models.experts import RoutedExperts, expert_capacity
from models.layers import MLP
from models.router import Router, expert_load, sequence_balance_loss


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

  def __call__(self, x_BTD, execution: Execution, valid_BT=None):
    """x [B, T, D] → ([B, T, D], aux); aux = {"expert_load": float32 [E] routed-token counts,
    "balance_loss": scalar}. valid_BT: [B, T] mask of real tokens for the balance loss."""
    if execution.expert_parallel is not None:
      y_BTD, aux = moe_parallel.routed_moe(self.router, self.experts, x_BTD, valid_BT, execution)
    else:
      y_BTD, aux = self._routed(x_BTD, valid_BT, execution)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    return y_BTD, aux

  def _routed(self, x_BTD, valid_BT, execution: Execution):
    cfg = self.cfg
    b, t, d = x_BTD.shape
    routing = self.router(x_BTD)
    experts_A = routing.experts_BTk.reshape(-1)
    capacity = None
    if execution.moe_backend == "capacity":
      capacity = expert_capacity(execution.capacity_factor, experts_A.shape[0], cfg.n_routed_experts)
    y_ND = self.experts(x_BTD.reshape(b * t, d), experts_A, routing.weights_BTk.reshape(-1), capacity,
                        execution.grouped_matmul)
    aux = {
        "expert_load": expert_load(routing.experts_BTk, cfg.n_routed_experts),
        "balance_loss": sequence_balance_loss(routing, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                              valid_BT),
    }
    return y_ND.reshape(b, t, d), aux
