"""The DeepSeek decoder-only Transformer: embedding, dense then MoE block stacks, norm, untied head,
and the optional depth-1 MTP module."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.block import make_stack, run_stack, self_attention
from models.config import ModelConfig
from models.execution import Execution
from models.layers import RMSNorm, matmul, param
from models.mla import attention_mask
from models.mtp import MTP
from models.rope import rope_tables


class ModelOutput(NamedTuple):
  logits: jax.Array  # float32 [B, T, V] (the compute dtype with Execution(logits_dtype="compute"))
  hidden: jax.Array  # final-normed hidden state [B, T, D]
  aux: dict[str, Any]  # per-MoE-layer metrics stacked on a leading [L] axis
  mtp_logits: jax.Array | None = None  # float32 [B, T-1, V]: row i predicts token i+2
  mtp_aux: dict[str, Any] | None = None

  def expert_loads(self) -> dict[str, jax.Array]:
    """Routed-token counts per MoE stack, keyed by the module that owns its router: {"moe_layers":
    [L, E], "mtp": [E]} (the ones this forward ran)."""
    loads = {}
    if "expert_load" in self.aux:
      loads["moe_layers"] = self.aux["expert_load"]
    if self.mtp_aux is not None and "expert_load" in self.mtp_aux:
      loads["mtp"] = self.mtp_aux["expert_load"]
    return loads


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
    self.dense_layers = make_stack(cfg, cfg.first_k_dense, moe=False, rngs=rngs)
    self.moe_layers = make_stack(cfg, cfg.num_moe_layers, moe=True, rngs=rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
    self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
    self.mtp = MTP(cfg, rngs=rngs) if cfg.mtp_depth else None

  def __call__(self, input_ids, positions=None, segment_ids=None):
    """int [B, T] token ids → float32 logits [B, T, V]."""
    return self.forward(input_ids, positions, segment_ids).logits

  def mtp_logits(self, input_ids, positions=None, segment_ids=None):
    """float32 [B, T-1, V]; row i predicts token i+2 (depth-1 MTP)."""
    return self.forward(input_ids, positions, segment_ids, with_mtp=True).mtp_logits

  def embed_tokens(self, ids_BT):
    return jnp.take(self.embed[...], ids_BT, axis=0).astype(self.cfg.dtype)

  def head(self, h_BTD, out_dtype=jnp.float32):
    return matmul(h_BTD, self.lm_head[...], self.cfg, "btd,dv->btv", out_dtype=out_dtype)

  def forward(self, input_ids, positions=None, segment_ids=None, *, with_mtp: bool = False,
              execution: Execution | None = None) -> ModelOutput:
    """Full forward pass. positions default to 0..T-1; segment_ids (packed documents) keep attention
    within a document. with_mtp also runs the MTP module. execution: how to run it (MoE backend,
    attention kernel, remat, expert parallelism); default `Execution()`, the exact reference path."""
    cfg = self.cfg
    execution = Execution() if execution is None else execution
    ids_BT = jnp.asarray(input_ids)
    if ids_BT.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {ids_BT.shape}")
    b, t = ids_BT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid_BT = None if segment_ids is None else (segment_ids != 0).astype(jnp.float32)
    cos_BTK, sin_BTK = rope_tables(positions, cfg)
    mask_B1TS = attention_mask(positions, positions, segment_ids, segment_ids)

    attention = self_attention(cos_BTK, sin_BTK, mask_B1TS, execution.attention_impl)
    h_BTD = self.embed_tokens(ids_BT)
    aux = {}
    if self.dense_layers is not None:
      h_BTD, _, _ = run_stack(self.dense_layers, h_BTD, attention, execution, valid_BT)
    if self.moe_layers is not None:
      h_BTD, aux, _ = run_stack(self.moe_layers, h_BTD, attention, execution, valid_BT)
    h_BTD = self.final_norm(h_BTD)
    logits_dtype = jnp.float32 if execution.logits_dtype == "float32" else cfg.dtype
    logits_BTV = self.head(h_BTD, logits_dtype)

    if not with_mtp:
      return ModelOutput(logits_BTV, h_BTD, aux)
    if self.mtp is None:
      raise ValueError("this model has no MTP module (mtp_depth=0)")
    # Row i: hidden at i with the embedding of token i+1, at token i+1's position and segment.
    shift = lambda a: None if a is None else a[:, 1:]
    mtp_segments = shift(segment_ids)
    mtp_positions = positions[:, 1:]
    cos2, sin2 = cos_BTK[:, 1:], sin_BTK[:, 1:]
    mask2 = attention_mask(mtp_positions, mtp_positions, mtp_segments, mtp_segments)
    mtp_attention = self_attention(cos2, sin2, mask2, execution.attention_impl)
    mtp_h, mtp_aux = self.mtp(h_BTD[:, :-1], self.embed_tokens(ids_BT[:, 1:]), mtp_attention, execution,
                              shift(valid_BT))
    return ModelOutput(logits_BTV, h_BTD, aux, self.head(mtp_h, logits_dtype), mtp_aux)
