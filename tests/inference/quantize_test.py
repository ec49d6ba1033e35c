"""Weight-only int8 (models/quantized.py, inference/quantize.py).

The reference for a quantized model is the same model with every quantized weight replaced by its
dequantized float32 value: the two compute the same function, so logits agree to float32 rounding and
greedy tokens are equal, through every path that reads a weight (attention projections, absorbed
latent attention, dense MLP, shared and routed experts on the module path and in the decode kernel,
the head). How much int8 changes a trained model is measured by `eval.py --quantize=int8`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

import inference
import models
from inference import experts
from models import quantized
from tests.inference import tiny_models

PALLAS = models.Execution(grouped_matmul="pallas")


def _dequantized(model):
  """`model` with every Int8Weight replaced by its float32 value."""
  model = nnx.clone(model)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param) and isinstance(node.get_value(), quantized.Int8Weight):
      node.set_value(node.get_value().dequantize(jnp.float32))
  return model


class QuantizeArrayTest(parameterized.TestCase):

  def test_per_channel_scales_and_rounding(self):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 7)), jnp.float32)
    w = w.at[:, :, 2].set(0.0)  # an all-zero channel keeps a finite scale
    q = quantized.quantize_int8(w, (-2,))
    self.assertEqual(q.values.dtype, jnp.int8)
    self.assertEqual(q.scale.shape, (3, 1, 7))
    live = [0, 1, 3, 4, 5, 6]
    np.testing.assert_allclose(q.scale[:, 0, live], np.abs(np.asarray(w)).max(axis=1)[:, live] / 127, rtol=1e-6)
    np.testing.assert_array_equal(q.scale[:, 0, 2], 1.0)
    self.assertEqual(int(jnp.max(jnp.abs(q.values.astype(jnp.int32)))), 127)
    err = np.abs(np.asarray(q.dequantize(jnp.float32) - w))
    self.assertTrue(np.all(err <= np.asarray(q.scale) / 2 * (1 + 1e-6)))
    np.testing.assert_array_equal(q.values[:, :, 2], 0)

  def test_indexing_and_split(self):
    q = quantized.quantize_int8(jnp.arange(24.0).reshape(2, 3, 4) - 11, (-2,))
    self.assertIs(q[...], q)
    layer = q[1]
    self.assertEqual((layer.values.shape, layer.scale.shape), ((3, 4), (1, 4)))
    a, b = quantized.split(q, [1], axis=-1)
    chex.assert_trees_all_equal(jnp.concatenate([a.dequantize(jnp.float32), b.dequantize(jnp.float32)], -1),
                                q.dequantize(jnp.float32))
    with self.assertRaisesRegex(ValueError, "contracted axis"):
      quantized.split(q, [1], axis=-2)
    with self.assertRaisesRegex(ValueError, "negative indices"):
      quantized.quantize_int8(jnp.ones((2, 2)), (0,))

  @parameterized.named_parameters(
      ("scale_on_output", "btd,dhk->bthk", (2, 3, 8), (8, 4, 5), (-3,)),
      ("ellipsis", "...d,df->...f", (2, 3, 8), (8, 6), (-2,)),
      ("two_contracted", "bthk,hkd->btd", (2, 3, 4, 5), (4, 5, 6), (-3, -2)),
      ("scale_on_input", "buhk,rhk->buhr", (2, 1, 4, 5), (6, 4, 5), (-3,)),  # absorbed W_UK
      ("scale_on_weight", "bhk,rhk->br", (2, 4, 5), (6, 4, 5), (-3,)),  # h contracted, k contracted
  )
  def test_einsum_equals_the_dequantized_einsum(self, spec, x_shape, w_shape, contracted):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    q = quantized.quantize_int8(jnp.asarray(rng.standard_normal(w_shape), jnp.float32), contracted)
    hi = jax.lax.Precision.HIGHEST
    got = quantized.einsum(spec, x, q, jnp.float32, jnp.float32, hi)
    want = jnp.einsum(spec, x, q.dequantize(jnp.float32), precision=hi)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class QuantizeModelTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = tiny_models.v3_style()
    cls.model = tiny_models.build(cls.cfg, seed=3)
    cls.before = jax.tree.map(np.asarray, nnx.state(cls.model))
    cls.quantized = inference.quantize(cls.model, "int8")

  def test_quantizes_the_matmul_weights_of_a_copy(self):
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(self.model)), self.before)
    kinds = {path[-1]: type(node.get_value()) for path, node in nnx.iter_graph(self.quantized)
             if isinstance(node, nnx.Param)}
    for name in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "gate", "up", "down", "eh_proj"):
      self.assertIs(kinds[name], quantized.Int8Weight, name)
    for name in ("embed", "kernel", "scale", "lm_head"):  # lookup, router, norms, head (by default)
      self.assertIsNot(kinds[name], quantized.Int8Weight, name)

  def test_generates_as_its_dequantized_weights(self):
    """The forward pass, and generation with the latent cache (absorbed attention reads W_UK with its
    scale moved onto the query; the expanded cache reads weights as the forward pass does)."""
    reference = _dequantized(self.quantized)
    ids = tiny_models.prompts(self.cfg, 2, 6, seed=4)
    np.testing.assert_allclose(self.quantized(ids)[0], reference(ids)[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(inference.generate(self.quantized, ids, 5), inference.generate(reference, ids, 5))

  def test_v2_lite_style_logits(self):
    """A single wq projection (contracted axis -3) and two shared experts."""
    cfg = tiny_models.v2_lite_style()
    q = inference.quantize(tiny_models.build(cfg, seed=2), include_head=True)
    self.assertIsInstance(q.lm_head.get_value(), quantized.Int8Weight)
    ids = tiny_models.prompts(cfg, 2, 6, seed=4)
    np.testing.assert_allclose(q(ids)[0], _dequantized(q)(ids)[0], atol=1e-4, rtol=0)

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_decode_kernel_reads_int8_experts(self, dtype):
    """inference/experts.py's kernel (interpreted) on int8 expert weights with per-column scales, as
    `moe_ffn` hands them over, equals the kernel on the dequantized weights (bf16: the same weights
    rounded to bf16, which holds every int8 value exactly, so only the scale's rounding differs)."""
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([3, 0, 9, 1], jnp.int32)
    x = jnp.asarray(rng.standard_normal((14, 24)), dtype)
    stored = tuple(quantized.quantize_int8(jnp.asarray(rng.standard_normal((2, 4, 24, 40)), jnp.float32), (-2,))
                   for _ in range(2))
    values, scales = experts._values_and_scales(stored)  # pylint: disable=protected-access
    self.assertEqual((values[0].dtype, scales[0].shape), (jnp.int8, (2, 4, 40)))
    tiles = dict(block_n=16, block_k=16, num_warps=4, num_stages=2, interpret=True)
    layer = jnp.asarray([1], jnp.int32)
    got = experts.grouped_ffn(x, values, layer, sizes, scales=scales, **tiles)
    want = experts.grouped_ffn(x, tuple(w.dequantize(jnp.float32) for w in stored), layer, sizes, **tiles)
    got, want = np.asarray(got[:13], np.float32), np.asarray(want[:13], np.float32)  # row 13: past the groups
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
    with self.assertRaisesRegex(ValueError, "all int8"):
      experts._values_and_scales((stored[0], stored[1].dequantize(jnp.float32)))  # pylint: disable=protected-access

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "unknown quantization"):
      inference.quantize(self.model, "int4")
    with self.assertRaisesRegex(ValueError, "already quantized"):
      inference.quantize(self.quantized)


if __name__ == "__main__":
  absltest.main()
