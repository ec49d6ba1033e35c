"""Multi-token prediction, depth 1 (DeepSeek-V3).

For position i the module combines the main model's final-normed hidden state h_i with the embedding
of token i+1, h'_i = W_eh [enorm(Emb(t_{i+1})); hnorm(h_i)], runs one MoE decoder block causally over
the shortened sequence, normalises, and predicts token i+2 with the shared output head.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.block import AttentionStep, DecoderBlock
from models.config import ModelConfig
from models.execution import Execution
from models.layers import RMSNorm, matmul, param


class MTP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.cfg = cfg
    self.enorm = RMSNorm(d, cfg, rngs=rngs)
    self.hnorm = RMSNorm(d, cfg, rngs=rngs)
    # Input rows: the embedding half first, then the hidden half (the released weights' layout).
    self.eh_proj = param(rngs, (2 * d, d), ("mtp_in", "embed"), cfg)
    self.block = DecoderBlock(cfg, moe=True, rngs=rngs)
    self.norm = RMSNorm(d, cfg, rngs=rngs)

  def __call__(self, h_BTD, next_emb_BTD, attention: AttentionStep, execution: Execution, valid_BT=None):
    """h: main hidden at positions i; next_emb: Emb(token i+1); attention: the step over the shifted
    positions (models.block.self_attention). Returns normed hidden and aux."""
    x_BTX = jnp.concatenate([self.enorm(next_emb_BTD), self.hnorm(h_BTD)], axis=-1)
    x_BTD = matmul(x_BTX, self.eh_proj[...], self.cfg, "btx,xd->btd")
    y_BTD, aux, _ = self.block(x_BTD, attention, execution, valid_BT)
    return self.norm(y_BTD), aux
