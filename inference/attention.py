"""MLA attention against a decode cache, built from `models.mla.MLA`'s query / latent / expand / output.

- `prefill_attention`: the prompt attends to itself in the expanded (multi-head) form — prefill is
  compute-bound and the expanded form needs fewer FLOPs — and returns the entries to cache.
- `cached_attention`: new tokens attend to the cache plus themselves. With the latent cache W_UK is
  folded into the query and W_UV into the output (absorbed MLA: per head, scores are taken against the
  shared latent c directly, so keys/values are never expanded); with the expanded cache it is plain
  multi-head attention over cached per-head K and V.

Shape letters as in models/config.py; S is the cache length, U the number of new tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from inference import mla_decode, streamed_matmul
from models import quantized
from models.layers import matmul, precision_for
from models.mla import MLA

_NEG = jnp.finfo(jnp.float32).min

# Settings of inference/mla_decode.py's kernel (tests run it interpreted on CPUs: interpret=True).
DECODE_KERNEL = {}
# With the kernel: the attention projections (wq or wq_a/wq_b, wkv_a, wo) through
# inference/streamed_matmul.py's split-K kernel instead of XLA's GEMMs, which ran at ~30 % of the HBM
# bandwidth at 32–64 rows on an H200 (73–86 µs a bench-model step for ~21 µs of weights). Off: with
# `dense=kernel` it made an H100 step slower (see inference/experts.py `SMALL_DENSE_KERNEL`).
STREAMED_PROJECTIONS = False


def _expanded_entries(k_nope_BTHK, v_BTHK, k_pe_BTK) -> dict[str, jax.Array]:
  """Per-head keys [k_nope | shared k_pe] and values, as an expanded cache keeps them."""
  k_pe_BTHK = jnp.broadcast_to(k_pe_BTK[:, :, None, :].astype(k_nope_BTHK.dtype),
                               k_nope_BTHK.shape[:3] + k_pe_BTK.shape[-1:])
  return {"k": jnp.concatenate([k_nope_BTHK, k_pe_BTHK], axis=-1), "v": v_BTHK}


def prefill_attention(attn: MLA, x_BTD, cos_BTK, sin_BTK, mask_B1TT, kind: str, impl: str = "xla"):
  """Causal self-attention over the prompt (as `MLA.__call__`) → (output [B,T,D], cache entries).

  impl: `Execution.attention_impl`. "cudnn" takes the training forward's fused kernel: the prompt is
  self-attention (T == S) under a plain causal mask (right padding needs no more: padded queries are
  never read), which is the mask it runs unmasked."""
  q_nope_BTHK, q_pe_BTHK = attn.query(x_BTD, cos_BTK, sin_BTK)
  c_BTR, k_pe_BTK = attn.latent(x_BTD, cos_BTK, sin_BTK)
  k_nope_BTHK, v_BTHK = attn.expand(c_BTR)
  o_BTHK = attn.expanded_attention(q_nope_BTHK, q_pe_BTHK, k_nope_BTHK, k_pe_BTK, v_BTHK, mask_B1TT, impl=impl)
  if kind == "latent":
    entries = {"c": c_BTR, "k_pe": k_pe_BTK}
  else:
    entries = _expanded_entries(k_nope_BTHK, v_BTHK, k_pe_BTK)
  return attn.output(o_BTHK), entries


def _softmax(scores_cache_BHUS, scores_new_BHUU, cache_valid_BS, new_mask_UU):
  """One float32 softmax over [cache keys | new keys]; returns the two halves of the probabilities."""
  s = scores_cache_BHUS.shape[-1]
  scores_cache_BHUS = jnp.where(cache_valid_BS[:, None, None, :], scores_cache_BHUS, _NEG)
  scores_new_BHUU = jnp.where(new_mask_UU[None, None], scores_new_BHUU, _NEG)
  probs = jax.nn.softmax(jnp.concatenate([scores_cache_BHUS, scores_new_BHUU], axis=-1), axis=-1)
  return probs[..., :s], probs[..., s:]


def cached_attention(attn: MLA, x_BUD, cos_BUK, sin_BUK, stack_cache: dict[str, jax.Array], layer,
                     lengths_B, kind: str, kernel: bool = False):
  """U new tokens per row (at the positions cos/sin encode) attend to the valid cache slots
  (s < lengths_B[b]) of layer `layer` of the stacked cache [L, B, S, ...] and, causally, to each
  other. Returns (output [B,U,D], the new tokens' cache entries); the cache itself is only read (the
  caller writes the entries after the layers). kernel: the latent cache through
  inference/mla_decode.py's Pallas kernel (GPUs), which reads the layer in place; otherwise the layer
  is sliced out for XLA's einsums."""
  cfg = attn.cfg
  u = x_BUD.shape[1]
  new_mask_UU = jnp.tril(jnp.ones((u, u), bool))
  project = streamed_matmul.project if kernel and kind == "latent" and STREAMED_PROJECTIONS else None
  q_nope_BUHK, q_pe_BUHK = attn.query(x_BUD, cos_BUK, sin_BUK, project)
  c_BUR, k_pe_BUK = attn.latent(x_BUD, cos_BUK, sin_BUK, project)
  s = next(iter(stack_cache.values())).shape[2]
  cache_valid_BS = jnp.arange(s)[None, :] < lengths_B[:, None]

  if kind == "latent":
    dt = stack_cache["c"].dtype
    f32 = dict(preferred_element_type=jnp.float32, precision=precision_for(dt))
    w_uk_RHK, w_uv_RHK = quantized.split(attn.wkv_b[...], [cfg.qk_nope_head_dim], axis=-1)
    # q_lat[b,u,h,r] = Σ_k q_nope[b,u,h,k]·W_UK[r,h,k]: scores against c stand for scores against k_nope.
    q_lat_BUHR = matmul(q_nope_BUHK, w_uk_RHK, cfg, "buhk,rhk->buhr").astype(dt)
    q_pe_BUHK = q_pe_BUHK.astype(dt)
    c_new, k_pe_new = c_BUR.astype(dt), k_pe_BUK.astype(dt)
    if kernel:
      o_lat_BUHR = mla_decode.latent_attention(q_lat_BUHR, q_pe_BUHK, stack_cache["c"], stack_cache["k_pe"],
                                               layer, lengths_B, c_new, k_pe_new, cfg.softmax_scale,
                                               **DECODE_KERNEL)
      o_BUHK = matmul(o_lat_BUHR, w_uv_RHK, cfg, "buhr,rhk->buhk")
      return attn.output(o_BUHK, project), {"c": c_BUR, "k_pe": k_pe_BUK}
    c_BSR, k_pe_BSK = stack_cache["c"][layer], stack_cache["k_pe"][layer]
    scores_cache = (jnp.einsum("buhr,bsr->bhus", q_lat_BUHR, c_BSR, **f32)
                    + jnp.einsum("buhk,bsk->bhus", q_pe_BUHK, k_pe_BSK, **f32))
    scores_new = (jnp.einsum("buhr,bsr->bhus", q_lat_BUHR, c_new, **f32)
                  + jnp.einsum("buhk,bsk->bhus", q_pe_BUHK, k_pe_new, **f32))
    p_cache, p_new = _softmax(scores_cache * cfg.softmax_scale, scores_new * cfg.softmax_scale,
                              cache_valid_BS, new_mask_UU)
    # (h, u) stay in the scores' order: XLA:CPU's DotThunk rejects some bf16→f32 dots that transpose.
    o_lat_BHUR = (jnp.einsum("bhus,bsr->bhur", p_cache.astype(dt), c_BSR, **f32)
                  + jnp.einsum("bhus,bsr->bhur", p_new.astype(dt), c_new, **f32))
    o_lat_BUHR = jnp.swapaxes(o_lat_BHUR, 1, 2)
    # W_UV applied once to the attended latent instead of to every cached token.
    o_BUHK = matmul(o_lat_BUHR, w_uv_RHK, cfg, "buhr,rhk->buhk")
    return attn.output(o_BUHK), {"c": c_BUR, "k_pe": k_pe_BUK}

  if kind != "expanded":
    raise ValueError(f"unknown cache kind {kind!r}")
  k_BSHK, v_BSHK = stack_cache["k"][layer], stack_cache["v"][layer]
  dt = k_BSHK.dtype
  f32 = dict(preferred_element_type=jnp.float32, precision=precision_for(dt))
  new = _expanded_entries(*attn.expand(c_BUR), k_pe_BUK)
  k_new, v_new = new["k"].astype(dt), new["v"].astype(dt)
  q_BUHK = jnp.concatenate([q_nope_BUHK, q_pe_BUHK.astype(q_nope_BUHK.dtype)], axis=-1).astype(dt)
  scores_cache = jnp.einsum("buhk,bshk->bhus", q_BUHK, k_BSHK, **f32)
  scores_new = jnp.einsum("buhk,bshk->bhus", q_BUHK, k_new, **f32)
  p_cache, p_new = _softmax(scores_cache * cfg.softmax_scale, scores_new * cfg.softmax_scale,
                            cache_valid_BS, new_mask_UU)
  o_BUHK = (jnp.einsum("bhus,bshk->buhk", p_cache.astype(dt), v_BSHK, **f32)
            + jnp.einsum("bhus,bshk->buhk", p_new.astype(dt), v_new, **f32)).astype(cfg.dtype)
  return attn.output(o_BUHK), new
