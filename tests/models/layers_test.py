"""mixed_einsum: exactly einsum in float32; bf16 operands in the backward products for a bf16 model."""

import re

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import mixed_einsum

SPECS = (("head", "btd,dv->btv", (2, 3, 8), (8, 5)), ("output", "bthk,hkd->btd", (2, 3, 4, 6), (4, 6, 8)),
         ("experts", "ecd,edf->ecf", (3, 4, 8), (3, 8, 5)))


def _inputs(x_shape, w_shape, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
          jnp.asarray(rng.standard_normal(w_shape), jnp.float32))


class MixedEinsumTest(parameterized.TestCase):

  @parameterized.named_parameters(*SPECS)
  def test_float32_is_plain_einsum_value_and_gradient(self, spec, x_shape, w_shape):
    x, w = _inputs(x_shape, w_shape)
    f32 = jnp.dtype(jnp.float32)
    mixed = lambda x, w: jnp.sum(jnp.sin(mixed_einsum(spec, x, w, f32, f32)))
    # float32 means full precision on every backend (a plain einsum runs as TF32 on Hopper GPUs).
    plain = lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST)))
    np.testing.assert_array_equal(mixed(x, w), plain(x, w))
    for got, want in zip(jax.grad(mixed, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  @parameterized.named_parameters(*SPECS)
  def test_bfloat16_backward_products_take_bfloat16_operands(self, spec, x_shape, w_shape):
    x, w = _inputs(x_shape, w_shape, seed=1)
    loss = lambda x, w: jnp.sum(jnp.sin(mixed_einsum(spec, x, w, jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))))
    grads = jax.grad(loss, (0, 1))(x, w)
    chex.assert_trees_all_equal_dtypes(grads, (x, w))  # gradients come back in the inputs' dtypes
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
    operand_types = re.findall(r"dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", hlo)
    self.assertLen(operand_types, 3)  # forward, d/dx, d/dw
    for a, b in operand_types:
      self.assertIn("bf16", a)
      self.assertIn("bf16", b)
    # And they are the float32 gradients up to bf16 rounding.
    plain = lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w)))
    for got, want in zip(grads, jax.grad(plain, (0, 1))(x, w)):
      self.assertLess(float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)), 3e-2)


if __name__ == "__main__":
  absltest.main()
