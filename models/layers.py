"""Basic building blocks: parameters with logical axis names, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig


def param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], cfg: ModelConfig, *,
          std: float | None = None, init: str = "normal") -> nnx.Param:
  """A parameter annotated with logical axis names (mapped to mesh axes by sharding/).

  Sharding is applied later from abstract shapes, never eagerly at creation.
  """
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and axes {axes} differ in rank")
  if init == "ones":
    value = jnp.ones(shape, cfg.param_dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, cfg.param_dtype)
  else:
    std = cfg.init_std if std is None else std
    value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, cfg.param_dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """x / rms(x) · scale, computed in float32."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, eps: float | None = None,
               axis_name: str = "norm"):
    self.scale = param(rngs, (dim,), (axis_name,), cfg, init="ones")
    self.eps = cfg.rms_norm_eps if eps is None else eps

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x).astype(dtype)


def matmul(x, w, cfg: ModelConfig, spec: str):
  """einsum in the compute dtype with float32 accumulation, returned in the compute dtype."""
  out = jnp.einsum(spec, x.astype(cfg.dtype), w.astype(cfg.dtype), preferred_element_type=jnp.float32)
  return out.astype(cfg.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Dense layers and shared experts."""

  def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.cfg = cfg
    self.gate = param(rngs, (d, width), ("embed", "mlp"), cfg)
    self.up = param(rngs, (d, width), ("embed", "mlp"), cfg)
    self.down = param(rngs, (width, d), ("mlp", "embed"), cfg)
    if cfg.mlp_bias:
      self.gate_bias = param(rngs, (width,), ("mlp",), cfg, init="zeros")
      self.up_bias = param(rngs, (width,), ("mlp",), cfg, init="zeros")
      self.down_bias = param(rngs, (d,), ("embed",), cfg, init="zeros")
    else:
      self.gate_bias = self.up_bias = self.down_bias = None

  def __call__(self, x_BTD):
    cfg = self.cfg
    gate_BTF = matmul(x_BTD, self.gate[...], cfg, "...d,df->...f")
    up_BTF = matmul(x_BTD, self.up[...], cfg, "...d,df->...f")
    if self.gate_bias is not None:
      gate_BTF = gate_BTF + self.gate_bias[...].astype(cfg.dtype)
      up_BTF = up_BTF + self.up_bias[...].astype(cfg.dtype)
    out_BTD = matmul(jax.nn.silu(gate_BTF) * up_BTF, self.down[...], cfg, "...f,fd->...d")
    if self.down_bias is not None:
      out_BTD = out_BTD + self.down_bias[...].astype(cfg.dtype)
    return out_BTD
