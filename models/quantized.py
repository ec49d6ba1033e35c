"""Weight-only int8: a weight stored as int8 values with float32 scales per output channel, and the
einsum that reads it (`models.layers.matmul` dispatches here when a parameter holds an `Int8Weight`).

Quantization is symmetric and per channel: over the axes a weight's own matmul contracts (its input
axes), scale = max|w| / 127 and values = round(w / scale) in [-127, 127]. The scale keeps those axes as
size 1 (`contracted`, counted from the end so a layer stack's leading [L] axis and its per-layer
slices share them). A matmul reads the int8 values (half the bytes of bf16), converts them to the
compute dtype as it loads them, and applies the scale where it is cheapest: to the float32 product
when the scale's axes are all output axes (the usual case), to the input when they are all
contracted (absorbed MLA contracts W_UK over its per-head output channels), else to the weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INT8_MAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """int8 `values` (the weight's shape) and float32 `scale` (the same rank; size 1 on `contracted`)."""
  values: jax.Array
  scale: jax.Array
  contracted: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # negative axis indices

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim

  @property
  def dtype(self):
    return self.values.dtype

  def __getitem__(self, key):
    """`param[...]` (how modules read a parameter) returns the weight itself; anything else indexes
    the leading (layer or expert) axes of values and scale alike."""
    if key is Ellipsis:
      return self
    return Int8Weight(self.values[key], self.scale[key], self.contracted)

  def dequantize(self, dtype) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array, contracted: tuple[int, ...]) -> Int8Weight:
  """w → Int8Weight with one scale per channel of the axes not in `contracted` (negative indices)."""
  if not contracted or any(not -w.ndim <= a < 0 for a in contracted):
    raise ValueError(f"contracted axes must be negative indices of a rank-{w.ndim} weight, got {contracted}")
  w = jnp.asarray(w, jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=contracted, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
  values = jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return Int8Weight(values, scale, tuple(sorted(contracted)))


def dequantize(w, dtype):
  """An Int8Weight in `dtype`; any other array unchanged."""
  return w.dequantize(dtype) if isinstance(w, Int8Weight) else w


def split(w, indices, axis: int = -1):
  """jnp.split for arrays and Int8Weights (along an axis the scale is not reduced over)."""
  if not isinstance(w, Int8Weight):
    return jnp.split(w, indices, axis=axis)
  if axis - w.ndim * (axis >= 0) in w.contracted:
    raise ValueError(f"cannot split an Int8Weight along its contracted axis {axis}")
  values = jnp.split(w.values, indices, axis=axis)
  scales = jnp.split(w.scale, indices, axis=axis)
  return [Int8Weight(v, s, w.contracted) for v, s in zip(values, scales)]


def _broadcast_to(scale_labels: str, scale, target: str, ndim: int):
  """scale (axes labelled scale_labels, in that order) reshaped to broadcast against an operand with
  einsum labels `target` ("...xy" or "xy") of rank ndim."""
  explicit = target.replace("...", "")
  offset = ndim - len(explicit)
  order = sorted(range(len(scale_labels)), key=lambda i: explicit.index(scale_labels[i]))
  scale = jnp.transpose(scale, order)
  shape = [1] * ndim
  for i in order:
    shape[offset + explicit.index(scale_labels[i])] = scale.shape[order.index(i)]
  return scale.reshape(shape)


def einsum(spec: str, x, w: Int8Weight, dtype, out_dtype, precision=None):
  """einsum(spec, x, dequantized w) in `dtype` with float32 accumulation, output in `out_dtype`; the
  int8 values are what is read, the scale is applied to the product, the input or (rarely) the weight."""
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  if "..." in rhs or len(rhs) != w.ndim:
    raise ValueError(f"einsum {spec!r}: the weight's labels must name each of its {w.ndim} axes")
  kept = [axis for axis in range(w.ndim) if axis - w.ndim not in w.contracted]
  labels = "".join(rhs[axis] for axis in kept)
  scale = jnp.squeeze(w.scale, axis=tuple(a + w.ndim for a in w.contracted))
  dot = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision)
  if all(label in out for label in labels):
    y = dot(x.astype(dtype), w.values.astype(dtype))
    y = y * _broadcast_to(labels, scale, out, y.ndim)
  elif all(label in lhs for label in labels):
    x = (x.astype(jnp.float32) * _broadcast_to(labels, scale, lhs, x.ndim)).astype(dtype)
    y = dot(x, w.values.astype(dtype))
  else:
    y = dot(x.astype(dtype), w.dequantize(dtype))
  return y.astype(out_dtype)
