"""Multi-head Latent Attention (DeepSeek-V2/V3), training and prefill path.

Keys and values come from a shared low-rank latent c = kv_norm(x W_DKV) (rank R), expanded per head by
W_UKV; a separate rope key k_pe (Kr dims) is shared by every head. The steps are factored so a decode
cache can keep only (c, k_pe) and absorb W_UK into the query and W_UV into the output.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import RMSNorm, matmul, param, precision_for
from models.rope import apply_rope


def attention_mask(q_positions_BT, kv_positions_BS, q_segments_BT=None, kv_segments_BS=None):
  """[B, 1, T, S] boolean: causal by position, and within one segment (packed documents)."""
  mask = q_positions_BT[:, :, None] >= kv_positions_BS[:, None, :]
  if q_segments_BT is not None:
    mask &= q_segments_BT[:, :, None] == kv_segments_BS[:, None, :]
  return mask[:, None]


class MLA(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.q_lora_rank is None:
      self.wq = param(rngs, (d, h, cfg.qk_head_dim), ("embed", "heads", "kv"), cfg)
    else:
      self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), cfg)
      self.q_norm = RMSNorm(cfg.q_lora_rank, cfg, rngs=rngs, eps=cfg.latent_norm_eps, axis_name="q_lora")
      self.wq_b = param(rngs, (cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "kv"), cfg)
    self.wkv_a = param(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), cfg)
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg, rngs=rngs, eps=cfg.latent_norm_eps, axis_name="kv_lora")
    self.wkv_b = param(rngs, (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                       ("kv_lora", "heads", "kv"), cfg)
    self.wo = param(rngs, (h, cfg.v_head_dim, d), ("heads", "kv", "embed"), cfg)
    if cfg.attention_bias:
      if cfg.q_lora_rank is not None:
        self.wq_a_bias = param(rngs, (cfg.q_lora_rank,), ("q_lora",), cfg, init="zeros")
      self.wkv_a_bias = param(rngs, (cfg.kv_lora_rank + cfg.qk_rope_head_dim,), ("kv_lora",), cfg,
                              init="zeros")
      self.wo_bias = param(rngs, (d,), ("embed",), cfg, init="zeros")

  def _bias(self, name):
    b = getattr(self, name, None)
    return 0 if b is None else b[...].astype(self.cfg.dtype)

  # `project` (query, latent, output): the matmul of the projection, `models.layers.matmul` by default;
  # generation passes a weight-streaming kernel for its few rows (inference/streamed_matmul.py).
  def query(self, x_BTD, cos_BTK, sin_BTK, project=None):
    """Per-head queries split into (q_nope [B,T,H,Kn], roped q_pe [B,T,H,Kr])."""
    cfg = self.cfg
    project = project or matmul
    if cfg.q_lora_rank is None:
      q_BTHK = project(x_BTD, self.wq[...], cfg, "btd,dhk->bthk")
    else:
      cq_BTR = project(x_BTD, self.wq_a[...], cfg, "btd,dr->btr") + self._bias("wq_a_bias")
      q_BTHK = project(self.q_norm(cq_BTR), self.wq_b[...], cfg, "btr,rhk->bthk")
    q_nope, q_pe = jnp.split(q_BTHK, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rope(q_pe, cos_BTK, sin_BTK, cfg.rope_interleave)

  def latent(self, x_BTD, cos_BTK, sin_BTK, project=None):
    """What an absorbed decode cache keeps: (kv_norm(c) [B,T,R], roped shared k_pe [B,T,Kr])."""
    cfg = self.cfg
    kv_BTX = (project or matmul)(x_BTD, self.wkv_a[...], cfg, "btd,dx->btx") + self._bias("wkv_a_bias")
    c_BTR, k_pe_BTK = jnp.split(kv_BTX, [cfg.kv_lora_rank], axis=-1)
    return self.kv_norm(c_BTR), apply_rope(k_pe_BTK, cos_BTK, sin_BTK, cfg.rope_interleave)

  def expand(self, c_BSR):
    """W_UKV: latent → per-head (k_nope [B,S,H,Kn], v [B,S,H,Kv])."""
    kv_BSHK = matmul(c_BSR, self.wkv_b[...], self.cfg, "bsr,rhk->bshk")
    return jnp.split(kv_BSHK, [self.cfg.qk_nope_head_dim], axis=-1)

  def output(self, o_BTHK, project=None):
    return (project or matmul)(o_BTHK, self.wo[...], self.cfg, "bthk,hkd->btd") + self._bias("wo_bias")

  def expanded_attention(self, q_nope_BTHK, q_pe_BTHK, k_nope_BSHK, k_pe_BSK, v_BSHK, mask_B1TS,
                         impl: str = "xla"):
    """Multi-head attention over expanded keys → [B,T,H,Kv]. The rope key is one head shared by all
    heads: it is scored separately instead of being broadcast (the "xla" path)."""
    if impl == "cudnn":  # Execution.check rejects it off GPUs before anything compiles
      return fused_attention(q_nope_BTHK, q_pe_BTHK, k_nope_BSHK, k_pe_BSK, v_BSHK, mask_B1TS,
                             self.cfg.softmax_scale, implementation="cudnn")
    f32 = dict(preferred_element_type=jnp.float32, precision=precision_for(q_nope_BTHK.dtype))
    scores_BHTS = (jnp.einsum("bthk,bshk->bhts", q_nope_BTHK, k_nope_BSHK, **f32)
                   + jnp.einsum("bthk,bsk->bhts", q_pe_BTHK, k_pe_BSK, **f32))
    return attend(scores_BHTS * self.cfg.softmax_scale, mask_B1TS, v_BSHK)

  def __call__(self, x_BTD, cos_BTK, sin_BTK, mask_B1TS, impl: str = "xla"):
    """Self-attention of x over itself under mask → [B,T,D]; impl as in `expanded_attention`."""
    q_nope_BTHK, q_pe_BTHK = self.query(x_BTD, cos_BTK, sin_BTK)
    c_BSR, k_pe_BSK = self.latent(x_BTD, cos_BTK, sin_BTK)
    k_nope_BSHK, v_BSHK = self.expand(c_BSR)
    return self.output(self.expanded_attention(q_nope_BTHK, q_pe_BTHK, k_nope_BSHK, k_pe_BSK, v_BSHK, mask_B1TS,
                                               impl=impl))


def fused_attention(q_nope_BTHK, q_pe_BTHK, k_nope_BSHK, k_pe_BSK, v_BSHK, mask_B1TS, scale: float,
                    implementation: str = "cudnn"):
  """Self-attention of a packed training batch through `jax.nn.dot_product_attention` (cuDNN flash).

  Assumes what the training forward guarantees: T == S, and positions increase along the sequence
  within each segment, so the position mask implies index causality (`is_causal` lets cuDNN skip
  the blocks above the diagonal; the mask still separates segments). jax's API wants equal key and
  value head sizes, so v is zero-padded to the qk head size and the output cut back.
  `implementation="xla"` runs the same arrangement anywhere (tests use it).
  """
  t, s = q_nope_BTHK.shape[1], k_nope_BSHK.shape[1]
  if t != s:
    raise ValueError(f"fused attention is self-attention (T == S); got T={t}, S={s}")
  heads, kv = q_nope_BTHK.shape[2], v_BSHK.shape[-1]
  q_BTHK = jnp.concatenate([q_nope_BTHK, q_pe_BTHK], axis=-1)
  k_pe_BSHK = jnp.broadcast_to(k_pe_BSK[:, :, None], (*k_pe_BSK.shape[:2], heads, k_pe_BSK.shape[-1]))
  k_BSHK = jnp.concatenate([k_nope_BSHK, k_pe_BSHK.astype(k_nope_BSHK.dtype)], axis=-1)
  v_BSHK = jnp.pad(v_BSHK, ((0, 0), (0, 0), (0, 0), (0, q_BTHK.shape[-1] - kv)))
  attend_with = lambda mask: jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask, scale=scale,
                                                          is_causal=True, implementation=implementation)
  # cuDNN turns a mask into an additive bias it reads for every block (on an H100, V2-Lite shapes at
  # 8x2048: 3.4x slower forward, 1.8x backward), so a batch whose mask is plain causality (one document
  # per row) takes the unmasked kernel; packed rows keep the mask.
  plain_causal = jnp.all(mask_B1TS == jnp.tril(jnp.ones((t, s), bool)))
  # jax's attention takes no precision argument; its float32 products (the xla implementation) follow
  # the default matmul precision, raised here as `precision_for` would set it.
  full = precision_for(q_BTHK.dtype) is not None
  with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
    o_BTHK = jax.lax.cond(plain_causal, lambda: attend_with(None), lambda: attend_with(mask_B1TS))
  return o_BTHK[..., :kv]


def attend(scores_BHTS, mask_B1TS, v_BSHK):
  """Masked float32 softmax over keys, then the weighted sum of values (in v's dtype)."""
  scores_BHTS = jnp.where(mask_B1TS, scores_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
  return jnp.einsum("bhts,bshk->bthk", probs_BHTS.astype(v_BSHK.dtype), v_BSHK,
                    preferred_element_type=jnp.float32,
                    precision=precision_for(v_BSHK.dtype)).astype(v_BSHK.dtype)
