"""Small-row matmuls that stream their weights: a Pallas (Triton) kernel split over the contraction.

At decode sizes (M = 32–64 rows) a dense layer's matmul is a read of its weight, and it is fast only if
enough programs read at once. A kernel whose programs each own a tile of output columns has too few of
them for a narrow output: V2-Lite's dense down product (10,944 → 2,048) is 16 column tiles of 128, so 16
of an H200's 132 SMs would stream its 45 MB (inference/experts.py's `dense=kernel`, measured slower than
XLA's GEMMs for that reason). `split_k_products` also splits the contraction K: program (j, s) reads
column tile j of the weights over the s-th of `splits` equal runs of K tiles and writes its float32
partial products; the caller sums the splits (XLA fuses that sum with what follows, e.g. SwiGLU's
silu(gate)·up). The partial sums cost splits × M × N × 4 bytes written and read, small next to the
weights at these M.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from inference.mla_decode import SMS
from models import quantized
from models.grouped_matmul import block_size
from models.layers import matmul, precision_for

_WAVES = 2  # programs per SM to aim for: one wave leaves SMs idle at the tail


def default_splits(n_tiles: int, k_tiles: int) -> int:
  """K splits that give about _WAVES programs per SM, at least one K tile each."""
  return max(1, min(k_tiles, -(-_WAVES * SMS // n_tiles)))


def split_k_products(x_MK, weights, scales=None, *, block_n: int = 128, block_k: int = 128,
                     num_warps: int = 4, num_stages: int = 3, splits: int | None = None,
                     interpret: bool = False) -> tuple[jax.Array, ...]:
  """x·w for each w [K, N] of `weights` → a float32 [M, N] per weight.

  x: [M, K] in the compute dtype, M ≤ 128 (every row in one row tile, so each weight is read once).
  weights: arrays of one shape [K, N], any float or int8 dtype (each tile is cast to x's dtype as it is
  loaded). scales: None, or one float32 [N] per weight (int8 per-column scales, applied to the
  products). Dots accumulate in float32 at `precision_for(x.dtype)` (IEEE for float32)."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel

  m, k = x_MK.shape
  n = weights[0].shape[-1]
  if m > 128:
    raise ValueError(f"split_k_products takes at most 128 rows, got {m}")
  if any(w.shape != (k, n) for w in weights) or any(s.shape != (n,) for s in scales or ()):
    raise ValueError(f"weights must all be [{k}, {n}] and scales [{n}]: "
                     f"{[w.shape for w in weights]}, {[s.shape for s in scales or ()]}")
  block_m = block_size(m)
  block_n = min(block_n, block_size(n))
  n_tiles, k_tiles = pl.cdiv(n, block_n), pl.cdiv(k, block_k)
  splits = min(splits or default_splits(n_tiles, k_tiles), k_tiles)
  tiles_per_split = pl.cdiv(k_tiles, splits)
  splits = pl.cdiv(k_tiles, tiles_per_split)  # no split left without a tile
  precision = precision_for(x_MK.dtype)
  num_weights, scales = len(weights), tuple(scales or ())

  def kernel(x_ref, *refs):
    w_refs, s_refs, out_refs = refs[:num_weights], refs[num_weights:-num_weights], refs[-num_weights:]
    j, s = pl.program_id(0), pl.program_id(1)
    all_rows = pl.ds(j * 0, block_m)  # a traced start: a static slice past M would be refused
    rows = (jnp.arange(block_m) < m)[:, None]
    cols = j * block_n + jnp.arange(block_n) < n

    def step(t, accs):
      i = s * tiles_per_split + t
      ks = i * block_k + jnp.arange(block_k) < k  # also false past this split's last tile of K
      a = plt.load(x_ref.at[all_rows, pl.ds(i * block_k, block_k)], mask=rows & ks[None, :], other=0)
      out = []
      for acc, w_ref in zip(accs, w_refs):
        b = plt.load(w_ref.at[pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)],
                     mask=ks[:, None] & cols[None, :], other=0).astype(a.dtype)
        out.append(acc + jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                                             preferred_element_type=jnp.float32))
      return tuple(out)

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    accs = jax.lax.fori_loop(0, tiles_per_split, step, tuple(zeros for _ in w_refs))
    for w, acc in enumerate(accs):
      if s_refs:
        acc = acc * plt.load(s_refs[w].at[pl.ds(j * block_n, block_n)], mask=cols, other=0)[None, :]
      plt.store(out_refs[w].at[s, all_rows, pl.ds(j * block_n, block_n)], acc, mask=rows & cols[None, :])

  partials_SMN = pl.pallas_call(
      kernel, out_shape=tuple(jax.ShapeDtypeStruct((splits, m, n), jnp.float32) for _ in weights),
      grid=(n_tiles, splits),
      in_specs=[pl.no_block_spec] * (1 + num_weights + len(scales)),
      out_specs=tuple(pl.no_block_spec for _ in weights),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="split_k_products",
  )(x_MK, *weights, *scales)
  return tuple(jnp.sum(p, axis=0) for p in partials_SMN)  # unstacked: each sum fuses into its consumer


# Settings of `project`'s kernel (tests run it interpreted on CPUs: interpret=True).
PROJECTION_TILES = dict(block_n=64, block_k=128, num_warps=4, num_stages=3)


def project(x, w, cfg, spec: str):
  """`models.layers.matmul(x, w, cfg, spec)` through `split_k_products` when the einsum is one: x's last
  axes contract w's first ones ("btd,dhk->bthk", "bthk,hkd->btd"), x has at most 128 rows, and an int8
  weight's scale is per output channel; otherwise `matmul` itself. The result is in cfg.dtype, as
  matmul's. The attention projections of a decode step (`models.mla.MLA`'s `project` argument)."""
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  shared = [label for label in lhs if label in rhs]
  c = len(shared)
  lead, rest = lhs[:len(lhs) - c], rhs[c:]
  ok = (lhs.endswith("".join(shared)) and rhs.startswith("".join(shared)) and out == lead + rest
        and "..." not in spec and x.ndim == len(lhs) and w.ndim == len(rhs))
  rows = int(math.prod(x.shape[:len(lead)])) if ok else 0
  contracted = tuple(range(-w.ndim, -w.ndim + c))
  if isinstance(w, quantized.Int8Weight):
    ok = ok and w.contracted == contracted
  if not ok or rows > 128:
    return matmul(x, w, cfg, spec)
  k = int(math.prod(x.shape[len(lead):]))
  n = int(math.prod(w.shape[c:]))
  x_MK = x.reshape(rows, k).astype(cfg.dtype)
  if isinstance(w, quantized.Int8Weight):
    values, scales = (w.values.reshape(k, n),), (w.scale.reshape(n),)
  else:
    values, scales = (w.reshape(k, n),), None
  (y_MN,) = split_k_products(x_MK, values, scales, **PROJECTION_TILES)
  return y_MN.astype(cfg.dtype).reshape(*x.shape[:len(lead)], *w.shape[c:])
