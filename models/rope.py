"""Rotary position embedding for MLA's decoupled rope dims, with YaRN context extension.

DeepSeek rotates adjacent pairs (x[2i], x[2i+1]) by angle pos·θ_i (the complex form). YaRN blends
interpolated (θ/s) and extrapolated (θ) frequencies by a linear ramp over the frequency index and
scales cos/sin by an attention factor; the softmax temperature part lives in ModelConfig.softmax_scale.
"""

from __future__ import annotations

import math

import numpy as np
import jax.numpy as jnp

from models.config import ModelConfig, yarn_mscale


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """θ_i for i < Kr/2 as float32 (computed in float32, like the reference)."""
  dim = cfg.qk_rope_head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.float32(cfg.rope_theta) ** exponents
  extrapolated = (1.0 / pos_freqs).astype(np.float32)
  if cfg.rope_type == "default":
    return extrapolated
  factor = cfg.yarn_factor
  interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
  original = cfg.original_max_position_embeddings

  def correction_dim(num_rotations):
    return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
  if cfg.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
  """The factor YaRN multiplies cos and sin by (1 without YaRN)."""
  if cfg.rope_type == "default":
    return 1.0
  if cfg.rope_attention_factor is not None:
    return cfg.rope_attention_factor
  if cfg.mscale and cfg.mscale_all_dim:
    return yarn_mscale(cfg.yarn_factor, cfg.mscale) / yarn_mscale(cfg.yarn_factor, cfg.mscale_all_dim)
  return yarn_mscale(cfg.yarn_factor)


def rope_tables(positions_BT, cfg: ModelConfig):
  """cos, sin of shape [B, T, Kr/2] in float32, already scaled by YaRN's attention factor."""
  inv_freq = jnp.asarray(inverse_frequencies(cfg))
  angles_BTK = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  factor = attention_factor(cfg)
  return jnp.cos(angles_BTK) * factor, jnp.sin(angles_BTK) * factor


def apply_rope(x_BTHK, cos_BTK, sin_BTK, interleave: bool = True):
  """Rotates the last axis of x (any number of head axes between T and K) by the tables.

  interleave=True pairs (x[2i], x[2i+1]) as DeepSeek does; False pairs (x[i], x[i+K/2]).
  """
  dtype = x_BTHK.dtype
  x = x_BTHK.astype(jnp.float32)
  extra = x.ndim - cos_BTK.ndim
  cos = cos_BTK.reshape(cos_BTK.shape[:2] + (1,) * extra + cos_BTK.shape[2:])
  sin = sin_BTK.reshape(cos.shape)
  if interleave:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(dtype)
