"""Absorbed-MLA decode attention over the latent cache as one Pallas (Triton) kernel per layer.

`cached_attention`'s latent branch (inference/attention.py) takes ~15 XLA fusions per layer that read
the latent cache twice, after the caller has copied the layer's cache out of the stacked [L, B, S, ·]
array: at batch 64 × 1024 slots on an H200, ~350 µs a step against ~50 µs to read the cache once.
`latent_attention` reads each layer's cache once, in place:
- the kernel indexes the stack with the layer number (`c_LBSR.at[layer, b, ...]`), so nothing is
  sliced out of it (a slice feeding a kernel is a copy);
- flash-decoding: program (m, b, j) takes row b's queries (the U·H query rows, `block_m` at a time:
  all of them on V2-Lite shapes) against split j of the row's valid cache slots, walks it in
  `block_s`-slot tiles with an online softmax (running max, sum and float32 [M, R] accumulator) and
  writes those three. The valid slots (s < lengths_B[b]) are divided evenly over the splits, so no
  tile past a row's length is loaded (early in a generation most of S is empty) and every split has
  work at any length; the splits fill the GPU at small batch;
- the splits are then merged in plain JAX together with the U new tokens (causal among themselves):
  [B, splits, M, R] is small, and the new tokens' keys never have to be written to the cache first.
Triton's block shapes are powers of two and its dots need every dim ≥ 16, so M, R and Kr are padded
(masked loads, zeros) up to that; S needs no multiple of block_s (the tail is masked).
On an H200 (bf16, V2-Lite heads: H=16, R=512, Kr=64; batch 64 × 1024 slots, all valid; a scratch run
of layer loops, not in benchmarks/): 27 µs a layer, merge included, against 82 µs for the reference
math with the layer's cache sliced out; the cache itself is 75 MB a layer, 18 µs at 4.3 TB/s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.grouped_matmul import block_size
from models.layers import precision_for

# H200 SMs. One program per SM at a time: its pipelined 64 × (512 + 64) bf16 tiles take 144–221 KB of
# shared memory (of 227). More than one wave of programs was slower on an H200 (bf16, batch 64 × 1024
# slots, 3 stages: 2 splits 27 µs a layer, 4 splits 35, 8 splits 42, merge included; a scratch run, not
# in benchmarks/).
SMS = 132


def default_splits(programs: int, s: int, block_s: int) -> int:
  """Splits of each row's cache when `programs` (B × query blocks) programs take every split: as many
  as one wave of programs holds (one per SM), at most one a tile of S, at least one."""
  return max(1, min(-(-s // block_s), SMS // programs))


def latent_attention(q_lat_BUHR, q_pe_BUHK, c_LBSR, k_pe_LBSK, layer, lengths_B, c_new_BUR, k_pe_new_BUK,
                     scale: float, *, block_s: int = 64, num_splits: int | None = None, block_m: int | None = None,
                     num_warps: int = 4, num_stages: int | None = None, interpret: bool = False) -> jax.Array:
  """-> o_lat float32 [B, U, H, R]: the latent-space attention output before W_UV.

  For row b, query (u, h): one float32 softmax of scale·(q_lat·c + q_pe·k_pe) over the cache slots
  s < lengths_B[b] of layer `layer` of the stacks and the new tokens u' ≤ u; o_lat = Σ p·c. Dots take
  the cache dtype and accumulate in float32 (`precision_for`). layer: int32 scalar, traced or not.
  block_m: query rows (of U·H) per program, default all (each program then holds an [M, R] float32
  accumulator: fine for V2-Lite's 16 heads; 32 was best of 16/32/64 for 128 heads on an H200).
  num_splits: programs per row (default `default_splits`); each row's valid slots are divided
  evenly over them in whole tiles. num_stages: default 3 for 2-byte caches (three 64 × 576 bf16 tiles:
  221 KB of shared memory at R=512), else 2 (float32 at 3 exceeds the H200's 227 KB)."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel

  b, u, h, r = q_lat_BUHR.shape
  kr = q_pe_BUHK.shape[-1]
  s = c_LBSR.shape[2]
  dt = c_LBSR.dtype
  precision = precision_for(dt)
  num_stages = num_stages or (3 if jnp.dtype(dt).itemsize <= 2 else 2)
  m = u * h
  rp, kp = block_size(r), block_size(kr)
  block_m = block_size(min(block_m or m, m))
  m_blocks = pl.cdiv(m, block_m)
  num_splits = num_splits or default_splits(b * m_blocks, s, block_s)
  q_lat_BMR = q_lat_BUHR.astype(dt).reshape(b, m, r)  # query row m = u·H + h
  q_pe_BMK = q_pe_BUHK.astype(dt).reshape(b, m, kr)
  layer_1 = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
  lengths_B = jnp.minimum(lengths_B.astype(jnp.int32), s)

  def kernel(layer_ref, lengths_ref, q_lat_ref, q_pe_ref, c_ref, k_pe_ref, acc_ref, m_ref, l_ref):
    i, row, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = lengths_ref[row]
    split_len = ((length + block_s - 1) // block_s + num_splits - 1) // num_splits * block_s  # whole tiles
    first = j * split_len
    end = jnp.minimum(first + split_len, length)  # slots [first, end) of this program: the row's valid
    # slots are divided evenly over its splits, so at any length every split works and none reads past it.
    rows = pl.ds(i * block_m, block_m)
    row_ok = (i * block_m + jnp.arange(block_m) < m)[:, None]
    r_ok, k_ok = (jnp.arange(rp) < r)[None, :], (jnp.arange(kp) < kr)[None, :]
    # A padded dim is read from a traced 0 (Triton folds it): a static slice past the array is refused.
    r_all = pl.ds(0 if rp == r else i * 0, rp)
    k_all = pl.ds(0 if kp == kr else i * 0, kp)
    q_lat = plt.load(q_lat_ref.at[row, rows, r_all], mask=row_ok & r_ok, other=0)
    q_pe = plt.load(q_pe_ref.at[row, rows, k_all], mask=row_ok & k_ok, other=0)
    nt = (((1,), (1,)), ((), ()))  # x·yᵀ
    nn = (((1,), (0,)), ((), ()))  # x·y

    def step(t, carry):
      m_i, l_i, acc = carry
      start = first + t * block_s
      valid = start + jnp.arange(block_s) < end
      c = plt.load(c_ref.at[layer, row, pl.ds(start, block_s), r_all], mask=valid[:, None] & r_ok, other=0)
      k_pe = plt.load(k_pe_ref.at[layer, row, pl.ds(start, block_s), k_all], mask=valid[:, None] & k_ok, other=0)
      scores = (jax.lax.dot_general(q_lat, c, nt, precision=precision, preferred_element_type=jnp.float32)
                + jax.lax.dot_general(q_pe, k_pe, nt, precision=precision, preferred_element_type=jnp.float32))
      scores = jnp.where(valid[None, :], scores * scale, -jnp.inf)  # every tile walked has a valid slot
      m_new = jnp.maximum(m_i, jnp.max(scores, axis=1))
      alpha = jnp.exp(m_i - m_new)
      p = jnp.exp(scores - m_new[:, None])
      acc = acc * alpha[:, None] + jax.lax.dot_general(p.astype(dt), c, nn, precision=precision,
                                                       preferred_element_type=jnp.float32)
      return m_new, l_i * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((block_m,), -jnp.inf, jnp.float32), jnp.zeros((block_m,), jnp.float32),
            jnp.zeros((block_m, rp), jnp.float32))
    m_i, l_i, acc = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first, 0), block_s), step, init)
    plt.store(acc_ref.at[row, j, rows, pl.ds(0, rp)], acc)
    plt.store(m_ref.at[row, j, rows], m_i)
    plt.store(l_ref.at[row, j, rows], l_i)

  mp = m_blocks * block_m
  acc_BPMR, m_BPM, l_BPM = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, num_splits, mp, rp), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, mp), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, mp), jnp.float32)),
      grid=(m_blocks, b, num_splits),  # query blocks of one (row, split) next to each other: one cache read
      in_specs=[pl.no_block_spec] * 6, out_specs=[pl.no_block_spec] * 3,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="mla_decode",
  )(layer_1, lengths_B, q_lat_BMR, q_pe_BMK, c_LBSR, k_pe_LBSK)
  acc_BPMR, m_BPM, l_BPM = acc_BPMR[:, :, :m, :r], m_BPM[:, :, :m], l_BPM[:, :, :m]

  # The new tokens, causal among themselves (query row m is token m // H), and the merge of the splits.
  f32 = dict(preferred_element_type=jnp.float32, precision=precision)
  c_new_BUR, k_pe_new_BUK = c_new_BUR.astype(dt), k_pe_new_BUK.astype(dt)
  scores_BMU = scale * (jnp.einsum("bmr,bur->bmu", q_lat_BMR, c_new_BUR, **f32)
                        + jnp.einsum("bmk,buk->bmu", q_pe_BMK, k_pe_new_BUK, **f32))
  causal_MU = jnp.arange(m)[:, None] // h >= jnp.arange(u)[None, :]
  scores_BMU = jnp.where(causal_MU[None], scores_BMU, -jnp.inf)
  top_BM = jnp.maximum(jnp.max(m_BPM, axis=1), jnp.max(scores_BMU, axis=-1))  # finite: token u sees itself
  w_BPM = jnp.exp(m_BPM - top_BM[:, None])  # an empty split (m = -inf, l = 0, acc = 0) weighs 0
  p_BMU = jnp.exp(scores_BMU - top_BM[..., None])
  num_BMR = (jnp.sum(w_BPM[..., None] * acc_BPMR, axis=1)
             + jnp.einsum("bmu,bur->bmr", p_BMU.astype(dt), c_new_BUR, **f32))
  den_BM = jnp.sum(w_BPM * l_BPM, axis=1) + jnp.sum(p_BMU, axis=-1)
  return (num_BMR / den_BM[..., None]).reshape(b, u, h, r)
