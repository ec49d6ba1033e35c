"""Grouped matmul: rows sorted by group, each group times its own matrix.

  out[r] = x[r] @ w[g] for the rows r of group g; groups are contiguous (group g is the group_sizes[g]
  rows after the first g groups) and rows past the last group belong to none.

`Execution.grouped_matmul` picks the implementation; layers never look at the platform.
- "xla": `jax.lax.ragged_dot` with float32 accumulation: the reference, exact on CPU; rows past the
  groups come out 0. On GPUs (jax 0.11) its backward materialises dense [groups, rows, ·] operands: out
  of memory at training sizes, ~7 TFLOP/s where it fits.
- "pallas": Pallas Triton kernels here for the product, the input's gradient (`grouped_product`)
  and the weight gradient (`weight_gradient`); GPU, bf16/fp16 operands (float32 operands run the xla
  path). No dependency beyond jax.
- "tokamax": tokamax's Pallas Mosaic GPU kernel for the product and the input's gradient, the Pallas
  weight gradient (tokamax's own is three times slower); the `gpu` extra; bf16/fp16 as above.
On both GPU paths rows past the groups are left unwritten, in the output and in the input's gradient:
callers must keep them out of every later product and gather (models/experts.py does; the weight
gradient never reads them). jax 0.11 deprecates the Pallas Triton backend (0.12 still has it); tokamax
(the `gpu` extra) is imported at the first call, never at module import.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import precision_for

IMPLS = ("auto", "xla", "pallas", "tokamax")  # "auto": an Execution nobody resolved for a platform → xla


def grouped_matmul(x_MK, w_GKN, group_sizes_G, impl: str, dtype):
  """x [M, K] rows sorted by group, w [G, K, N], int32 group_sizes [G] (sum ≤ M) → [M, N] in `dtype`
  (the compute dtype; operands are cast to it, products accumulate in float32)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown grouped matmul {impl!r}; expected one of {IMPLS}")
  x_MK, w_GKN = x_MK.astype(dtype), w_GKN.astype(dtype)
  if impl in ("pallas", "tokamax") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return _gpu_grouped_matmul(x_MK, w_GKN, group_sizes_G.astype(jnp.int32), impl)
  return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G, precision=precision_for(dtype),
                            preferred_element_type=jnp.float32).astype(dtype)


# tokamax's tiling for the product and the input's gradient, as fields of its ragged-dot Config; None:
# tokamax's own choice (its autotuning data for the device kind, else its heuristics; it has no H200
# data). A module setting for benchmarks/grouped_matmul.py to compare tilings.
TOKAMAX_CONFIG: dict | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gpu_grouped_matmul(x_MK, w_GKN, group_sizes_G, impl: str):
  return _product(impl, x_MK, w_GKN, group_sizes_G, transpose_w=False)


def _gpu_fwd(x_MK, w_GKN, group_sizes_G, impl: str):
  return _gpu_grouped_matmul(x_MK, w_GKN, group_sizes_G, impl), (x_MK, w_GKN, group_sizes_G)


def _gpu_bwd(impl: str, residuals, dy_MN):
  x_MK, w_GKN, group_sizes_G = residuals
  dx_MK = _product(impl, dy_MN, w_GKN, group_sizes_G, transpose_w=True)
  dw_GKN = weight_gradient(x_MK, dy_MN, group_sizes_G, w_GKN.dtype, **TILES["weight_gradient"])
  return dx_MK, dw_GKN, np.zeros(group_sizes_G.shape, jax.dtypes.float0)


_gpu_grouped_matmul.defvjp(_gpu_fwd, _gpu_bwd)


def _product(impl: str, x_MK, w_GKN, group_sizes_G, *, transpose_w: bool):
  if impl == "pallas":
    return grouped_product(x_MK, w_GKN, group_sizes_G, transpose_w=transpose_w, **TILES["product"])
  return _tokamax_ragged_dot(x_MK, jnp.swapaxes(w_GKN, 1, 2) if transpose_w else w_GKN, group_sizes_G)


def _tokamax_ragged_dot(x_MK, w_GKN, group_sizes_G):
  tokamax = _tokamax()
  implementation = "mosaic"
  if TOKAMAX_CONFIG is not None:
    # tokamax.ops.gpu, which exports these, also imports its Triton kernels (they need jax-triton).
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu  # pylint: disable=import-outside-toplevel
    implementation = [pallas_mosaic_gpu.PallasMosaicGpuRaggedDot(
        config=pallas_mosaic_gpu.Config(**TOKAMAX_CONFIG))]
  return tokamax.ragged_dot(x_MK, w_GKN, tokamax.RaggedDotGroupSizes(group_sizes_G, x_MK.shape[0]),
                            precision=jax.lax.Precision.DEFAULT, preferred_element_type=x_MK.dtype,
                            implementation=implementation)


@functools.cache
def _tokamax():
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"grouped_matmul='tokamax' needs tokamax, the gpu extra (pip install -e '.[gpu]'): "
                      f"{e}") from e
  return tokamax


# Pallas Triton kernels (GPU; `interpret=True` runs them anywhere, slowly); TILES below are among the
# fastest benchmarks/grouped_matmul.py tried on an H200 at the bench model's MoE shapes.
# `grouped_product` tiles each group's rows on its own (a tile never mixes groups; a group's last tile
# is partial), so it needs at most ceil(M / block_m) + G - 1 row tiles; `weight_gradient` streams each
# group's rows through one [block_m, block_n] accumulator per program (tokamax 0.0.17's Mosaic kernel
# for it runs at ~170 TFLOP/s on an H200, a third of this one; its Triton one needs jax-triton and a
# newer Triton than the GPU image has).
TILES = {"product": dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
         "weight_gradient": dict(block_m=128, block_n=256, block_k=32, num_warps=8, num_stages=4)}


def row_tiles(group_sizes_G, m: int, block_m: int):
  """Row tiles of `grouped_product`: (group, first row, end row) int32 [T] each, T = ceil(m / block_m)
  + G - 1; tile t covers rows [first, min(first + block_m, end)) of one group; unused tiles are empty.
  The tile → group lookup is one [T, G] comparison: jnp.searchsorted's default method is a while loop,
  rounds of tiny kernels (~70 µs per layer at decode sizes on an H200, inference/experts.py)."""
  g = group_sizes_G.shape[0]
  num_tiles = -(-m // block_m) + g - 1
  ends_G = jnp.cumsum(group_sizes_G)
  tiles_G = -(-group_sizes_G // block_m)  # per group; 0 for an empty one
  tile_ends_G = jnp.cumsum(tiles_G)
  t = jnp.arange(num_tiles, dtype=jnp.int32)
  group_T = jnp.minimum(jnp.searchsorted(tile_ends_G, t, side="right", method="compare_all"),
                        g - 1).astype(jnp.int32)
  first_T = ends_G[group_T] - group_sizes_G[group_T] + (t - tile_ends_G[group_T] + tiles_G[group_T]) * block_m
  used_T = t < tile_ends_G[-1]
  return group_T, jnp.where(used_T, first_T, 0), jnp.where(used_T, ends_G[group_T], 0)


def grouped_product(x_MK, w_GKN, group_sizes_G, *, transpose_w: bool = False, interpret: bool = False,
                    block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int):
  """[M, N] in x's dtype: rows of group g times w[g] ([K, N]; with transpose_w, w is [G, N, K] and
  w[g]ᵀ is used), float32 accumulation. Rows past the groups are not written."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel

  m, k = x_MK.shape
  n = w_GKN.shape[1] if transpose_w else w_GKN.shape[2]
  group_T, first_T, end_T = row_tiles(group_sizes_G.astype(jnp.int32), m, block_m)
  block_n = min(block_n, block_size(n))
  precision = precision_for(x_MK.dtype)  # float32 (tests, interpreted) at full precision

  def kernel(group_ref, first_ref, end_ref, x_ref, w_ref, out_ref):
    j, t = pl.program_id(0), pl.program_id(1)  # N tiles vary fastest: a row tile is read once
    g, first, end = group_ref[t], first_ref[t], end_ref[t]
    rows = (first + jnp.arange(block_m) < end)[:, None]
    cols = (j * block_n + jnp.arange(block_n) < n)

    @pl.when(first < end)
    def _():
      def step(i, acc):
        ks = (i * block_k + jnp.arange(block_k) < k)
        a = plt.load(x_ref.at[pl.ds(first, block_m), pl.ds(i * block_k, block_k)], mask=rows & ks[None, :],
                     other=0)
        if transpose_w:  # w[g] is [N, K]: contract both tiles' second dims
          b = plt.load(w_ref.at[g, pl.ds(j * block_n, block_n), pl.ds(i * block_k, block_k)],
                       mask=cols[:, None] & ks[None, :], other=0)
          dims = (((1,), (1,)), ((), ()))
        else:
          b = plt.load(w_ref.at[g, pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)],
                       mask=ks[:, None] & cols[None, :], other=0)
          dims = (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)

      acc = jax.lax.fori_loop(0, pl.cdiv(k, block_k), step, jnp.zeros((block_m, block_n), jnp.float32))
      plt.store(out_ref.at[pl.ds(first, block_m), pl.ds(j * block_n, block_n)], acc.astype(out_ref.dtype),
                mask=rows & cols[None, :])

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), x_MK.dtype),
      grid=(pl.cdiv(n, block_n), group_T.shape[0]),
      in_specs=[pl.no_block_spec] * 5, out_specs=pl.no_block_spec,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="grouped_product",
  )(group_T, first_T, end_T, x_MK, w_GKN)


def weight_gradient(x_MK, dy_MN, group_sizes_G, dtype, *, interpret: bool = False, block_m: int,
                    block_n: int, block_k: int, num_warps: int, num_stages: int):
  """[G, K, N]: out[g] = x[rows of g]ᵀ · dy[rows of g] in `dtype` (float32 accumulation); rows past the
  groups are not read; an empty group gets zeros."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel

  m, k = x_MK.shape
  n = dy_MN.shape[1]
  g = group_sizes_G.shape[0]
  block_m, block_n = min(block_m, block_size(k)), min(block_n, block_size(n))
  bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes_G.astype(jnp.int32))])
  precision = precision_for(x_MK.dtype)

  def kernel(bounds_ref, x_ref, dy_ref, out_ref):
    i, j, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = bounds_ref[e], bounds_ref[e + 1]
    cols_k = i * block_m + jnp.arange(block_m) < k
    cols_n = j * block_n + jnp.arange(block_n) < n

    def step(t, acc):
      start = lo + t * block_k
      rows = (start + jnp.arange(block_k) < hi)[:, None]
      a = plt.load(x_ref.at[pl.ds(start, block_k), pl.ds(i * block_m, block_m)], mask=rows & cols_k[None, :],
                   other=0)
      b = plt.load(dy_ref.at[pl.ds(start, block_k), pl.ds(j * block_n, block_n)], mask=rows & cols_n[None, :],
                   other=0)
      return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, block_k), step, jnp.zeros((block_m, block_n), jnp.float32))
    plt.store(out_ref.at[e, pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)],
              acc.astype(out_ref.dtype), mask=cols_k[:, None] & cols_n[None, :])

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((g, k, n), dtype),
      grid=(pl.cdiv(k, block_m), pl.cdiv(n, block_n), g),
      in_specs=[pl.no_block_spec] * 3, out_specs=pl.no_block_spec,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="grouped_weight_gradient",
  )(bounds, x_MK, dy_MN)


def block_size(n: int) -> int:
  """The Triton block a dim of n takes: the next power of two, at least 16 (a dot's minimum)."""
  return 1 << max(4, (n - 1).bit_length())
