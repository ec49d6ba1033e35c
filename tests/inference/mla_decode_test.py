"""inference/mla_decode.py: the fused latent-cache decode attention against a float64 NumPy reference.

The kernel runs in Pallas's interpreter (CPU), so what is checked is its indexing, masking and
online-softmax merge; Triton's compilation of it only happens on a GPU."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from inference import attention, mla_decode
from inference.attention import cached_attention
from models.mla import MLA
from tests.inference import tiny_models

SCALE = 0.3


def _inputs(seed, b, u, h, r, kr, s, layers=3):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # pylint: disable=unnecessary-lambda-assignment
  return dict(q_lat_BUHR=normal(b, u, h, r), q_pe_BUHK=normal(b, u, h, kr), c_LBSR=normal(layers, b, s, r),
              k_pe_LBSK=normal(layers, b, s, kr), c_new_BUR=normal(b, u, r), k_pe_new_BUK=normal(b, u, kr))


def _reference(x, layer, lengths_B, scale=SCALE):
  """float64: per (b, u, h), one softmax over the valid cache slots and the new tokens u' ≤ u."""
  x = {k: np.asarray(v, np.float64) for k, v in x.items()}
  b, u, h, r = x["q_lat_BUHR"].shape
  out = np.zeros((b, u, h, r))
  for i in range(b):
    n = lengths_B[i]
    for t in range(u):
      keys_c = np.concatenate([x["c_LBSR"][layer, i, :n], x["c_new_BUR"][i, :t + 1]])
      keys_pe = np.concatenate([x["k_pe_LBSK"][layer, i, :n], x["k_pe_new_BUK"][i, :t + 1]])
      scores = scale * (x["q_lat_BUHR"][i, t] @ keys_c.T + x["q_pe_BUHK"][i, t] @ keys_pe.T)  # [H, keys]
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[i, t] = (p / p.sum(-1, keepdims=True)) @ keys_c
  return out


def _check(x, layer, lengths, **kw):
  lengths = np.asarray(lengths, np.int32)
  run = jax.jit(lambda x, lengths: mla_decode.latent_attention(**x, layer=layer, lengths_B=lengths, scale=SCALE,
                                                                interpret=True, **kw))  # jit: interprets faster
  out = run(x, jnp.asarray(lengths))
  ref = _reference(x, layer, lengths)
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("u", [1, 3])
def test_ragged_lengths_over_several_splits(u):
  """H=4 (M = 4 or 12 rows, padded to 16); S=70 is no multiple of block_s=16; 3 splits of each row's
  valid tiles: length 0 (new tokens only; every split empty), 5 (1 tile: splits 1 and 2 empty), 32
  (tile edge: split 2 empty) and S (2 + 2 + 1 tiles, the last one S's masked tail)."""
  x = _inputs(0, b=4, u=u, h=4, r=32, kr=8, s=70)
  _check(x, 0, [0, 5, 32, 70], block_s=16, num_splits=3)


def test_traced_layer_picks_its_layer_of_the_stack():
  """layer is an argument of the jit: layer 1 of 3 stacks, each layer its own data."""
  x = _inputs(1, b=2, u=2, h=4, r=32, kr=8, s=40)
  lengths = jnp.asarray([40, 23], jnp.int32)
  run = jax.jit(lambda x, layer: mla_decode.latent_attention(**x, layer=layer, lengths_B=lengths, scale=SCALE,
                                                             block_s=16, interpret=True))
  out, ref = np.asarray(run(x, jnp.int32(1))), _reference(x, 1, [40, 23])
  np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  assert np.abs(out - _reference(x, 0, [40, 23])).max() > 1e-2  # not layer 0's answer


def test_dims_that_are_not_powers_of_two_and_query_blocks():
  """R=24 (padded to 32), H=3·U=2 (M=6), two query blocks of 16 rows (H=12), default splits."""
  x = _inputs(2, b=2, u=2, h=3, r=24, kr=8, s=50)
  _check(x, 2, [17, 50], block_s=16)
  x = _inputs(3, b=2, u=2, h=12, r=24, kr=8, s=50)
  _check(x, 1, [50, 0], block_s=16, block_m=16, num_splits=2)


def test_default_splits():
  """One wave of programs (one per H200 SM: 132), at most one split a tile of S, at least one."""
  assert mla_decode.default_splits(64, 1024, 64) == 2
  assert mla_decode.default_splits(1, 1024, 64) == 16
  assert mla_decode.default_splits(512, 1024, 64) == 1
  assert mla_decode.default_splits(8, 100, 64) == 2
  assert mla_decode.default_splits(8 * 4, 1024, 64) == 4  # 4 query blocks a row


def test_matches_cached_attention():
  """Through W_UK before and W_UV and W_O after, the kernel gives `cached_attention`'s latent output
  (tiny V3-style MLA: H=4, R=16, Kr=8), reading layer 1 of a 2-layer stack."""
  cfg = tiny_models.v3_style()
  b, u, s = 2, 2, 20
  rng = np.random.default_rng(4)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MLA(cfg, rngs=nnx.Rngs(0))))  # filled from numpy: fast
  state = jax.tree.map(lambda a: jnp.asarray(cfg.init_std * rng.standard_normal(a.shape), a.dtype), state)
  x_BUD = jnp.asarray(rng.standard_normal((b, u, cfg.hidden_size)), jnp.float32)
  angle = rng.uniform(0, 6, (b, u, cfg.qk_rope_head_dim // 2))
  cos_BUK, sin_BUK = jnp.asarray(np.cos(angle), jnp.float32), jnp.asarray(np.sin(angle), jnp.float32)
  c_LBSR = jnp.asarray(rng.standard_normal((2, b, s, cfg.kv_lora_rank)), jnp.float32)
  k_pe_LBSK = jnp.asarray(rng.standard_normal((2, b, s, cfg.qk_rope_head_dim)), jnp.float32)
  lengths = jnp.asarray([7, 20], jnp.int32)

  @jax.jit
  def both(state, layer):
    attn = nnx.merge(graphdef, state)
    cache = {"c": c_LBSR, "k_pe": k_pe_LBSK}
    ref, ref_entries = cached_attention(attn, x_BUD, cos_BUK, sin_BUK, cache, layer, lengths, "latent")
    with mock.patch.dict(attention.DECODE_KERNEL, block_s=16, interpret=True):
      out, entries = cached_attention(attn, x_BUD, cos_BUK, sin_BUK, cache, layer, lengths, "latent", kernel=True)
    return out, ref, entries, ref_entries

  out, ref, entries, ref_entries = both(state, jnp.int32(1))
  chex.assert_trees_all_equal(entries, ref_entries)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * float(jnp.abs(ref).max()), rtol=0)
