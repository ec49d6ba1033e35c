"""The pre-norm decoder block and the scanned stack of identical blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, RMSNorm
from models.mla import MLA
from models.moe import MoE


class DecoderBlock(nnx.Module):
  """h + MLA(norm(h)), then + FFN(norm(h)); the FFN is a dense MLP or DeepSeekMoE."""

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.attn = MLA(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.dense_intermediate_size, rngs=rngs)

  def __call__(self, h_BTD, cos_BTK, sin_BTK, mask_B1TS, valid_BT=None):
    h_BTD = h_BTD + self.attn(self.attn_norm(h_BTD), cos_BTK, sin_BTK, mask_B1TS)
    if isinstance(self.ffn, MoE):
      y_BTD, aux = self.ffn(self.ffn_norm(h_BTD), valid_BT)
    else:
      y_BTD, aux = self.ffn(self.ffn_norm(h_BTD)), {}
    return h_BTD + y_BTD, aux


def make_stack(cfg: ModelConfig, num: int, *, moe: bool, rngs: nnx.Rngs) -> DecoderBlock | None:
  """`num` identical blocks whose parameters carry a leading "layers" axis (None when num == 0)."""
  if num == 0:
    return None

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(layer_rngs):
    return DecoderBlock(cfg, moe=moe, rngs=layer_rngs)

  return build(rngs)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def run_stack(stack: DecoderBlock, h_BTD, cos_BTK, sin_BTK, mask_B1TS, valid_BT=None):
  """Applies the stacked blocks in order with `lax.scan`, so compile time does not grow with depth.

  Returns the final hidden state and each aux metric stacked over layers ([L, ...]).
  """
  graphdef, state = nnx.split(stack)

  def body(h, layer_state):
    block = nnx.merge(graphdef, layer_state)
    return block(h, cos_BTK, sin_BTK, mask_B1TS, valid_BT)

  policy = stack.cfg.remat_policy
  if policy != "none":
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[policy], prevent_cse=False)
  return jax.lax.scan(body, h_BTD, state)
