"""training/step.py `cast_matmul_weights` / Execution(cast_weights_once=True): which leaves are cast, and
the same loss and gradients on a bf16 tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from configs import tiny
from models import quantized
from training import optimizer as optim_lib
from training import step as step_lib
from training.state import init_state


class CastWeightsOnceTest(absltest.TestCase):
  """Execution(cast_weights_once=True) on a bf16 tiny model: which leaves are cast, and the same loss
  and gradients as casting inside each matmul (every gradient is one bf16 product either way)."""

  def test_same_loss_and_gradients_in_bfloat16(self):
    config = tiny.get_config()
    config.model.update(dtype="bfloat16")
    model_cfg = models.from_dict(config.model.to_dict())
    modeldef, state = init_state(model_cfg, optim_lib.make_optimizer(config.optim, 10), 0)
    rng = np.random.default_rng(6)
    batch = {"tokens": jnp.asarray(rng.integers(0, model_cfg.vocab_size, (2, 32)), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32)),
             "segment_ids": jnp.ones((2, 32), jnp.int32)}
    grad = lambda execution: jax.jit(jax.value_and_grad(step_lib.make_loss(modeldef, config, execution)))(
        state.params, state.router_bias, batch)
    loss, grads = grad(models.Execution())
    cast_loss, cast_grads = grad(models.Execution(cast_weights_once=True))
    np.testing.assert_allclose(cast_loss, loss, rtol=1e-6)
    # Bit-identical on CPU; a GPU may pick another GEMM algorithm for a bf16 output than for float32.
    rtol = 1e-6 if jax.default_backend() == "cpu" else 2e-2
    flat, cast_flat = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, cast_grads))
    for (path, g), (_, c) in zip(flat, cast_flat):
      self.assertEqual(c.dtype, jnp.float32)  # the cast's transpose hands the optimizer float32
      np.testing.assert_allclose(np.asarray(c), np.asarray(g), rtol=rtol, atol=1e-7,
                                 err_msg=jax.tree_util.keystr(path))
    cast = step_lib.cast_matmul_weights(state.params, jnp.bfloat16)
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)}
    self.assertEqual(dtypes["['embed']"], jnp.float32)
    self.assertEqual(dtypes["['lm_head']"], jnp.bfloat16)
    self.assertTrue(all(d == jnp.float32 for k, d in dtypes.items() if "router" in k or "scale" in k))
    self.assertIn(jnp.dtype(jnp.bfloat16), {d for k, d in dtypes.items() if "experts" in k})
    # A quantized weight keeps its float32 scale (a dataclass field, not a dict key).
    int8 = quantized.Int8Weight(jnp.zeros((3, 4, 5), jnp.int8), jnp.ones((3, 1, 5), jnp.float32), (-2,))
    cast_int8 = step_lib.cast_matmul_weights({"ffn": {"gate": int8}}, jnp.bfloat16)["ffn"]["gate"]
    self.assertEqual((cast_int8.values.dtype, cast_int8.scale.dtype), (jnp.int8, jnp.float32))


if __name__ == "__main__":
  absltest.main()
