"""The pre-norm decoder block and the scanned stack of identical blocks, for training and decoding.

The block's attention is a pluggable step, `attention(mla, x_BTD, layer_cache) → (out_BTD, entries)`:
`self_attention(...)` for the training / eval forward (no cache), or inference/attention.py's prefill
and cached-decode steps, which read a layer's cache and return the entries to write. The FFN branch,
the norms and the layer scan are the same code in every case.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from models.config import ModelConfig
from models.execution import Execution
from models.layers import MLP, RMSNorm
from models.mla import MLA
from models.moe import MoE

# (mla, normed input [B, T, D], this layer's cache or None) → (attention output [B, T, D], entries).
AttentionStep = Callable[[MLA, jax.Array, Any], tuple[jax.Array, Any]]


def self_attention(cos_BTK, sin_BTK, mask_B1TS, impl: str = "xla") -> AttentionStep:
  """The training forward's attention step: each position attends within `mask`; no cache."""
  return lambda mla, x_BTD, layer_cache: (mla(x_BTD, cos_BTK, sin_BTK, mask_B1TS, impl), None)


class DecoderBlock(nnx.Module):
  """h + MLA(norm(h)), then + FFN(norm(h)); the FFN is a dense MLP or DeepSeekMoE."""

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.attn = MLA(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.dense_intermediate_size, rngs=rngs)

  def __call__(self, h_BTD, attention: AttentionStep, execution: Execution, valid_BT=None, layer_cache=None):
    """→ (h [B, T, D], aux: MoE metrics or {}, the attention step's cache entries or None)."""
    out_BTD, entries = attention(self.attn, self.attn_norm(h_BTD), layer_cache)
    h_BTD = h_BTD + out_BTD
    if isinstance(self.ffn, MoE):
      y_BTD, aux = self.ffn(self.ffn_norm(h_BTD), execution, valid_BT)
    else:
      y_BTD, aux = self.ffn(self.ffn_norm(h_BTD)), {}
    return h_BTD + y_BTD, aux, entries


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


def run_stack(stack: DecoderBlock, h_BTD, attention: AttentionStep, execution: Execution, valid_BT=None,
              stack_cache=None):
  """Applies the stacked blocks in order with `lax.scan`, so compile time does not grow with depth
  (`execution.unroll_layers`: the scan fully unrolled, the same function without a while loop).

  stack_cache: the stack's cache with a leading [L] axis on every entry (read per layer), or None.
  Returns (final hidden state, aux metrics stacked [L, ...], cache entries stacked [L, ...] or None).
  """
  graphdef, state = nnx.split(stack)

  def body(h, xs):
    layer_state, layer_cache = xs
    h, aux, entries = nnx.merge(graphdef, layer_state)(h, attention, execution, valid_BT, layer_cache)
    return h, (aux, entries)

  if execution.remat_policy != "none":
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[execution.remat_policy], prevent_cse=False)
  h_BTD, (aux, entries) = jax.lax.scan(body, h_BTD, (state, stack_cache), unroll=execution.unroll_layers)
  return h_BTD, aux, entries
