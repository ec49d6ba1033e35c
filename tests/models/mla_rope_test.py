"""RoPE / YaRN against complex-number and numpy references, and MLA against a float64 reference."""

import math

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import rope
from models.config import yarn_mscale
from models.mla import MLA, attention_mask, fused_attention
from tests.models import tiny_configs as tc

B, T, H = 2, 12, 3


def _np_yarn_inv_freq(dim, theta, factor, original, beta_fast, beta_slow, truncate=True):
  """YaRN (Peng et al.): blend θ_i/s (interpolate) and θ_i (extrapolate) by a linear ramp over the
  frequency index between the dims that complete beta_fast and beta_slow turns in `original`."""
  i = np.arange(dim // 2, dtype=np.float64)
  extrapolated = theta ** (-2 * i / dim)
  interpolated = extrapolated / factor
  dim_for = lambda turns: dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))
  low, high = dim_for(beta_fast), dim_for(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if high == low:
    high += 0.001
  ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
  extrapolation_factor = 1 - ramp
  return interpolated * (1 - extrapolation_factor) + extrapolated * extrapolation_factor


def _np_rope_complex(x, positions_BT, inv_freq, interleave=True):
  """x [B, T, ..., K] rotated as complex numbers z·e^{i·pos·θ} in complex128."""
  half = x.shape[-1] // 2
  x = x.astype(np.float64)
  re, im = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
  angle = positions_BT.astype(np.float64)[..., None] * inv_freq
  angle = angle.reshape(angle.shape[:2] + (1,) * (x.ndim - 3) + angle.shape[2:])
  z = (re + 1j * im) * np.exp(1j * angle)
  if interleave:
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  return np.concatenate([z.real, z.imag], axis=-1)


def _positions(seed=0, lo=0, hi=40):
  return np.sort(np.random.default_rng(seed).integers(lo, hi, (B, T)), axis=-1).astype(np.int32)


class RopeTest(chex.TestCase):

  @parameterized.parameters(True, False)
  def test_matches_complex_multiplication(self, interleave):
    cfg = tc.v3_style(rope_type="default", qk_rope_head_dim=16)
    x = np.random.default_rng(1).standard_normal((B, T, H, 16)).astype(np.float32)
    pos = _positions(1)
    inv_freq = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    cos, sin = rope.rope_tables(jnp.asarray(pos), cfg)
    np.testing.assert_allclose(cos, np.cos(pos[..., None] * inv_freq), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(pos[..., None] * inv_freq), atol=1e-6)
    out = rope.apply_rope(jnp.asarray(x), cos, sin, interleave)
    np.testing.assert_allclose(out, _np_rope_complex(x, pos, inv_freq, interleave), atol=1e-6)
    # Also for a head-less [B, T, K] input (MLA's shared rope key).
    out3 = rope.apply_rope(jnp.asarray(x[:, :, 0]), cos, sin, interleave)
    np.testing.assert_allclose(out3, _np_rope_complex(x[:, :, 0], pos, inv_freq, interleave), atol=1e-6)

  def test_preserves_norms(self):
    cfg = tc.v3_style(rope_type="default")
    x = np.random.default_rng(2).standard_normal((B, T, H, cfg.qk_rope_head_dim)).astype(np.float32)
    cos, sin = rope.rope_tables(jnp.asarray(_positions(2)), cfg)
    out = rope.apply_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    self.assertGreater(np.abs(np.asarray(out) - x).max(), 0.1)

  @parameterized.named_parameters(("default", "default"), ("yarn", "yarn"))
  def test_scores_depend_only_on_relative_position(self, rope_type):
    cfg = tc.v3_style(rope_type=rope_type)
    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((B, T, cfg.qk_rope_head_dim)).astype(np.float32) for _ in range(2))
    q_pos, k_pos = _positions(3), _positions(4)

    def scores(shift):
      qc, qs = rope.rope_tables(jnp.asarray(q_pos + shift), cfg)
      kc, ks = rope.rope_tables(jnp.asarray(k_pos + shift), cfg)
      return np.einsum("btk,bsk->bts", rope.apply_rope(jnp.asarray(q), qc, qs), rope.apply_rope(jnp.asarray(k), kc, ks))

    np.testing.assert_allclose(scores(5), scores(0), atol=1e-5, rtol=1e-5)
    self.assertGreater(np.abs(scores(0) - np.einsum("btk,bsk->bts", q, k)).max(), 0.1)

  @parameterized.parameters(
      dict(dim=8, theta=10000.0, factor=4.0, original=8, beta_fast=32.0, beta_slow=1.0, truncate=True),
      dict(dim=16, theta=10000.0, factor=2.0, original=32, beta_fast=32.0, beta_slow=1.0, truncate=True),
      dict(dim=64, theta=10000.0, factor=40.0, original=4096, beta_fast=32.0, beta_slow=1.0, truncate=True),
      dict(dim=64, theta=10000.0, factor=40.0, original=4096, beta_fast=32.0, beta_slow=1.0, truncate=False),
      dict(dim=32, theta=50000.0, factor=8.0, original=512, beta_fast=16.0, beta_slow=2.0, truncate=True),
  )
  def test_yarn_inverse_frequencies(self, dim, theta, factor, original, beta_fast, beta_slow, truncate):
    cfg = tc.v3_style(qk_rope_head_dim=dim, rope_theta=theta, rope_factor=factor,
                      original_max_position_embeddings=original, beta_fast=beta_fast, beta_slow=beta_slow,
                      yarn_truncate=truncate)
    ours = rope.inverse_frequencies(cfg)
    ref = _np_yarn_inv_freq(dim, theta, factor, original, beta_fast, beta_slow, truncate)
    self.assertEqual(ours.shape, (dim // 2,))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    plain = theta ** (-np.arange(0, dim, 2) / dim)
    self.assertFalse(np.allclose(ref, plain, rtol=1e-3), "YaRN left every frequency unchanged")
    np.testing.assert_allclose(ref[0], plain[0], rtol=1e-12)  # the fastest frequency is extrapolated
    np.testing.assert_allclose(
        rope.inverse_frequencies(cfg.replace(rope_type="default")), plain, rtol=1e-6)

  def test_yarn_scales_cos_sin_by_attention_factor(self):
    cfg = tc.v3_style()  # factor 4, mscale 1, mscale_all_dim 0.8
    cos, sin = rope.rope_tables(jnp.asarray(_positions(5)), cfg)
    expected = (0.1 * math.log(4.0) + 1) / (0.08 * math.log(4.0) + 1)
    np.testing.assert_allclose(np.sqrt(np.asarray(cos) ** 2 + np.asarray(sin) ** 2), expected, rtol=1e-6)

  @parameterized.parameters((4.0, 0.8), (40.0, 1.0), (2.0, 0.707))
  def test_softmax_scale(self, factor, mscale_all_dim):
    cfg = tc.v3_style(rope_factor=factor, mscale_all_dim=mscale_all_dim)
    m = 0.1 * mscale_all_dim * math.log(factor) + 1
    self.assertAlmostEqual(cfg.softmax_scale, cfg.qk_head_dim ** -0.5 * m * m, places=12)
    self.assertAlmostEqual(yarn_mscale(factor, mscale_all_dim), m, places=12)
    self.assertAlmostEqual(cfg.replace(rope_type="default").softmax_scale, 16 ** -0.5, places=12)
    self.assertAlmostEqual(cfg.replace(mscale_all_dim=0.0).softmax_scale, 16 ** -0.5, places=12)


def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_mla(attn, x, cos, sin, mask, cfg):
  """Float64 MLA with full per-head keys [k_nope ; k_pe broadcast over heads] and causal softmax."""
  p = lambda v: np.asarray(v[...], np.float64)
  bias = lambda name: p(getattr(attn, name)) if hasattr(attn, name) else 0.0
  x = x.astype(np.float64)
  h, kn = cfg.num_heads, cfg.qk_nope_head_dim
  if cfg.q_lora_rank is None:
    q = np.einsum("btd,dhk->bthk", x, p(attn.wq))
  else:
    cq = _rms_norm(x @ p(attn.wq_a) + bias("wq_a_bias"), p(attn.q_norm.scale), cfg.latent_norm_eps)
    q = np.einsum("btr,rhk->bthk", cq, p(attn.wq_b))
  kv = x @ p(attn.wkv_a) + bias("wkv_a_bias")
  c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
  c = _rms_norm(c, p(attn.kv_norm.scale), cfg.latent_norm_eps)
  kv_heads = np.einsum("bsr,rhk->bshk", c, p(attn.wkv_b))
  k_nope, v = kv_heads[..., :kn], kv_heads[..., kn:]

  def rot(z):  # interleaved pairs as complex numbers; cos/sin already hold any YaRN factor
    w = (z[..., 0::2] + 1j * z[..., 1::2]) * (cos + 1j * sin).reshape(cos.shape[:2] + (1,) * (z.ndim - 3) + cos.shape[2:])
    return np.stack([w.real, w.imag], -1).reshape(z.shape)

  q = np.concatenate([q[..., :kn], rot(q[..., kn:])], -1)
  k = np.concatenate([k_nope, np.broadcast_to(rot(k_pe)[:, :, None], k_nope.shape[:3] + (cfg.qk_rope_head_dim,))], -1)
  s = np.einsum("bthk,bshk->bhts", q, k) * cfg.softmax_scale
  s = np.where(mask, s, -np.inf)
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshk->bthk", prob, v)
  return np.einsum("bthk,hkd->btd", o, p(attn.wo)) + bias("wo_bias")


class MLATest(chex.TestCase):

  @parameterized.named_parameters(
      ("q_lora_yarn", dict()),
      ("no_q_lora", dict(q_lora_rank=None, rope_type="default")),
      ("attention_bias", dict(attention_bias=True)),
      ("packed_segments", dict(), True),
  )
  def test_matches_float64_reference(self, overrides, packed=False):
    cfg = tc.v3_style(num_heads=H, **overrides)
    attn = tc.materialize(lambda: MLA(cfg, rngs=nnx.Rngs(0)), cfg, seed=7)
    if cfg.attention_bias:
      self.assertGreater(np.abs(np.asarray(attn.wo_bias[...])).max(), 0)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    segments = None
    if packed:
      segments = np.repeat([[1, 2], [1, 1]], [5, T - 5], axis=1).astype(np.int32)
      pos[0, 5:] -= 5
    # Independent rope tables (the YaRN frequencies and factor from the references above).
    if cfg.rope_type == "yarn":
      inv = _np_yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor,
                              cfg.original_max_position_embeddings, cfg.beta_fast, cfg.beta_slow)
      factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    else:
      inv, factor = 10000.0 ** (-np.arange(0, cfg.qk_rope_head_dim, 2) / cfg.qk_rope_head_dim), 1.0
    cos, sin = np.cos(pos[..., None] * inv) * factor, np.sin(pos[..., None] * inv) * factor
    mask = pos[:, None, :, None] >= pos[:, None, None, :]
    if packed:
      mask &= segments[:, None, :, None] == segments[:, None, None, :]
    np.testing.assert_array_equal(
        attention_mask(jnp.asarray(pos), jnp.asarray(pos), *(() if segments is None else (segments, segments))), mask)
    out = attn(jnp.asarray(x), jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32), jnp.asarray(mask))
    chex.assert_shape(out, (B, T, cfg.hidden_size))
    np.testing.assert_allclose(out, _np_mla(attn, x, cos, sin, mask, cfg), atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(("packed", True), ("one_document_per_row", False))
  def test_fused_attention_arrangement_matches_the_einsum_path(self, packed):
    # The cuDNN path's layout (q/k concatenated, the shared rope key broadcast, v zero-padded, is_causal
    # plus the segment mask, or no mask for plain causality), run through jax's XLA implementation so
    # it can be checked on any device.
    cfg = tc.v3_style(num_heads=H)
    attn = tc.materialize(lambda: MLA(cfg, rngs=nnx.Rngs(0)), cfg, seed=3)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    if packed:
      segments = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 2]], [4, 3, T - 7], axis=1), jnp.int32)
      pos = jnp.asarray(np.concatenate([np.arange(4), np.arange(3), np.arange(T - 7)])[None].repeat(B, 0),
                        jnp.int32)
      pos = pos.at[1].set(np.concatenate([np.arange(7), np.arange(T - 7)]))
    else:
      segments = jnp.ones((B, T), jnp.int32)
      pos = jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1))
    angles = pos[..., None] * (10000.0 ** (-np.arange(0, cfg.qk_rope_head_dim, 2) / cfg.qk_rope_head_dim))
    cos, sin = jnp.cos(angles).astype(jnp.float32), jnp.sin(angles).astype(jnp.float32)
    mask = attention_mask(pos, pos, segments, segments)
    q_nope, q_pe = attn.query(x, cos, sin)
    c, k_pe = attn.latent(x, cos, sin)
    k_nope, v = attn.expand(c)
    expected = attn.expanded_attention(q_nope, q_pe, k_nope, k_pe, v, mask)
    got = fused_attention(q_nope, q_pe, k_nope, k_pe, v, mask, cfg.softmax_scale, implementation="xla")
    chex.assert_shape(got, expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)



if __name__ == "__main__":
  absltest.main()
