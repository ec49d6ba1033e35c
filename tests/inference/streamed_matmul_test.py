"""inference/streamed_matmul.py's split-K kernel, interpreted (CPU), against float32 matmuls."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from inference import streamed_matmul
from inference.quantize import CONTRACTED
from models import quantized
from models.layers import matmul
from tests.inference import tiny_models

HIGHEST = jax.lax.Precision.HIGHEST


def _problem(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  ws = tuple(jnp.asarray(rng.standard_normal((k, n)), jnp.float32) for _ in range(2))
  return x, ws


class SplitKProductsTest(parameterized.TestCase):

  # Ragged shapes: M below a power of two, K and N not multiples of their tiles; splits that divide the
  # K tiles, that do not (a shorter last split), the default, and more than there are K tiles.
  @parameterized.parameters((5, 100, 40, 1), (5, 100, 40, 3), (17, 300, 72, None), (32, 64, 16, 9))
  def test_float32_matches_the_matmul(self, m, k, n, splits):
    x, ws = _problem(m, k, n)
    got = streamed_matmul.split_k_products(x, ws, block_n=32, block_k=32, splits=splits, interpret=True)
    self.assertEqual([out.shape for out in got], [(m, n)] * 2)
    for w, out in zip(ws, got):
      np.testing.assert_allclose(out, jnp.dot(x, w, precision=HIGHEST), rtol=1e-5, atol=1e-4)

  def test_int8_weights_with_their_scales(self):
    x, ws = _problem(9, 80, 48, seed=1)
    q = [quantized.quantize_int8(w, (-2,)) for w in ws]
    got = streamed_matmul.split_k_products(x, tuple(w.values for w in q), tuple(w.scale[0] for w in q),
                                           block_n=16, block_k=32, splits=2, interpret=True)
    for w, out in zip(q, got):
      np.testing.assert_allclose(out, jnp.dot(x, w.dequantize(jnp.float32), precision=HIGHEST), rtol=1e-5, atol=1e-4)

  def test_bfloat16_accumulates_in_float32(self):
    x, ws = _problem(8, 512, 32, seed=2)
    x, ws = x.astype(jnp.bfloat16), tuple(w.astype(jnp.bfloat16) for w in ws)
    got = streamed_matmul.split_k_products(x, ws[:1], block_n=32, block_k=64, interpret=True)[0]
    self.assertEqual(got.dtype, jnp.float32)
    want = jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32), precision=HIGHEST)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)

  def test_default_splits_fill_two_waves(self):
    self.assertEqual(streamed_matmul.default_splits(n_tiles=16, k_tiles=86), 17)  # V2-Lite dense down
    self.assertEqual(streamed_matmul.default_splits(n_tiles=300, k_tiles=16), 1)
    self.assertEqual(streamed_matmul.default_splits(n_tiles=16, k_tiles=4), 4)

  def test_bad_shapes_fail_clearly(self):
    x, ws = _problem(4, 32, 16)
    with self.assertRaisesRegex(ValueError, "at most 128 rows"):
      streamed_matmul.split_k_products(jnp.zeros((129, 32)), ws, interpret=True)
    with self.assertRaisesRegex(ValueError, "weights must all be"):
      streamed_matmul.split_k_products(x, (ws[0], ws[1][:, :8]), interpret=True)


class ProjectTest(parameterized.TestCase):
  """`project` against `models.layers.matmul` on MLA's projection einsums (float32: full precision)."""

  CASES = (("btd,dhk->bthk", (2, 3, 16), (16, 4, 6), "wq"), ("btd,dx->btx", (2, 3, 16), (16, 10), "wkv_a"),
           ("bthk,hkd->btd", (2, 3, 4, 6), (4, 6, 16), "wo"))

  @parameterized.product(case=(0, 1, 2), int8=(False, True))
  def test_matches_matmul(self, case, int8):
    spec, x_shape, w_shape, name = self.CASES[case]
    cfg = tiny_models.v3_style(dtype=jnp.float32)
    rng = np.random.default_rng(case)
    x, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in (x_shape, w_shape))
    if int8:
      w = quantized.quantize_int8(w, CONTRACTED.get(name, (-2,)))
    with mock.patch.dict(streamed_matmul.PROJECTION_TILES, interpret=True, block_n=16, block_k=16), \
         mock.patch.object(streamed_matmul, "matmul", side_effect=AssertionError("fell back")):
      got = streamed_matmul.project(x, w, cfg, spec)
    want = matmul(x, w, cfg, spec)
    self.assertEqual((got.shape, got.dtype), (want.shape, want.dtype))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_other_einsums_and_many_rows_take_matmul(self):
    cfg = tiny_models.v3_style(dtype=jnp.float32)
    q, w_uk = jnp.ones((2, 1, 4, 6)), jnp.ones((8, 4, 6))
    many, w = jnp.ones((3, 50, 16)), jnp.ones((16, 10))
    with mock.patch.object(streamed_matmul, "split_k_products", side_effect=AssertionError("streamed")):
      streamed_matmul.project(q, w_uk, cfg, "buhk,rhk->buhr")  # batched over heads: not one matmul
      streamed_matmul.project(many, w, cfg, "btd,dx->btx")  # 150 rows


if __name__ == "__main__":
  absltest.main()
