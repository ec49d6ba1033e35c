"""training/eval.py `make_eval_step`: its sums equal the plain formulas on the model's own logits
(next-token and MTP NLL over a packed batch's targets, target bytes, counts), float32."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import models
from configs import tiny
from training import eval as eval_lib
from training import optimizer as optim_lib
from training import step as step_lib
from training.state import init_state


def _nll(logits_BTV, targets_BT):
  logp = jax.nn.log_softmax(logits_BTV, axis=-1)
  return -np.take_along_axis(np.asarray(logp), np.asarray(targets_BT)[..., None], axis=-1)[..., 0]


class EvalStepTest(absltest.TestCase):

  def test_sums_equal_the_sliced_formulas(self):
    config = tiny.get_config()
    model_cfg = models.from_dict(config.model.to_dict())
    self.assertGreater(model_cfg.mtp_depth, 0)
    modeldef, state = init_state(model_cfg, optim_lib.make_optimizer(config.optim, 10), 0)
    segments = np.array([[1] * 20 + [2] * 9 + [0] * 3, [1] * 32], np.int32)
    positions = np.array([list(range(20)) + list(range(9)) + [0] * 3, list(range(32))], np.int32)
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (2, 32)).astype(np.int32)
    batch = {k: jnp.asarray(v) for k, v in (("tokens", tokens), ("positions", positions), ("segment_ids", segments))}
    token_bytes = np.random.default_rng(1).integers(1, 4, model_cfg.vocab_size).astype(np.float32)

    sums, _ = jax.jit(eval_lib.make_eval_step(modeldef, token_bytes))(state, batch)
    out = jax.jit(lambda s, b: step_lib.forward(modeldef, s.params, s.router_bias, b, with_mtp=True,
                                                 execution=models.Execution()))(state, batch)
    for offset, logits, nll_key, count_key in ((1, out.logits, "nll_sum", "count"),
                                               (2, out.mtp_logits, "mtp_nll_sum", "mtp_count")):
      src, dst = segments[:, :-offset], segments[:, offset:]
      mask = (src == dst) & (dst > 0)
      nll = _nll(logits[:, :tokens.shape[1] - offset], tokens[:, offset:])
      np.testing.assert_allclose(sums[nll_key], np.sum(np.where(mask, nll, 0.0)), rtol=1e-5)
      self.assertEqual(float(sums[count_key]), float(mask.sum()))
      if offset == 1:
        np.testing.assert_allclose(sums["bytes"], np.sum(np.where(mask, token_bytes[tokens[:, 1:]], 0.0)))
    self.assertGreater(float(sums["count"]), 50)


if __name__ == "__main__":
  absltest.main()
