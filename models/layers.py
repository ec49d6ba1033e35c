"""Basic building blocks: parameters with logical axis names, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import quantized
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


def precision_for(dtype):
  """The dot precision for operands of compute dtype `dtype`: HIGHEST for float32/float64, else None.

  XLA runs float32 dots as TF32 on Hopper GPUs by default (10-bit mantissas, ~1e-3 relative
  error) and TPUs run them as one bf16 pass, so a float32 model would silently differ by backend.
  Lower precisions keep the backend default: asking more of a bf16 dot only costs speed.
  """
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) in (jnp.float32, jnp.float64) else None


def matmul(x, w, cfg: ModelConfig, spec: str, out_dtype=None):
  """einsum in the compute dtype with float32 accumulation, returned in `out_dtype` (default: the
  compute dtype). Its backward pass runs in the compute dtype too (see `mixed_einsum`). A weight
  quantized for inference (`models.quantized.Int8Weight`) is read as int8 (no gradient)."""
  if isinstance(w, quantized.Int8Weight):
    dtype = jnp.dtype(cfg.dtype)
    return quantized.einsum(spec, x, w, dtype, jnp.dtype(out_dtype or cfg.dtype), precision_for(dtype))
  return mixed_einsum(spec, x, w, jnp.dtype(cfg.dtype), jnp.dtype(out_dtype or cfg.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def mixed_einsum(spec: str, x, w, dtype, out_dtype):
  """einsum(spec, x, w) on operands cast to `dtype`, accumulated in float32, output in `out_dtype`.

  Plain autodiff would hand the transposed products the float32 cotangent of the float32
  accumulator, turning every backward matmul of a bf16 model into a float32 one (tf32 kernels on a
  GPU, measured at 25 % of a train step). Here the cotangent is cast to `dtype` first, so the
  backward products take `dtype` operands like the forward one (float32 accumulation on GPU/TPU).
  For dtype float32 this is exactly the plain einsum and its gradient, at full precision (see
  `precision_for`; the transposed products inherit it).
  """
  return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32,
                    precision=precision_for(dtype)).astype(out_dtype)


def _mixed_einsum_fwd(spec, x, w, dtype, out_dtype):
  return mixed_einsum(spec, x, w, dtype, out_dtype), (x, w)


def _mixed_einsum_bwd(spec, dtype, out_dtype, residuals, g):
  x, w = residuals
  einsum = lambda a, b: jnp.einsum(spec, a, b, precision=precision_for(dtype))
  _, transpose = jax.vjp(einsum, x.astype(dtype), w.astype(dtype))
  dx, dw = transpose(g.astype(dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


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
