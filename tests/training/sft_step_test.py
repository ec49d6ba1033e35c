"""The supervised fine-tuning pieces of the train step: the loss mask and LoRA's frozen base.

A packed batch of two "examples" per row whose loss mask marks completion tokens; the tiny:test model.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

import models
from configs import tiny
from models import lora
from training import loss as loss_lib
from training import optimizer as optim_lib
from training import step as step_lib
from training.state import TrainState, split_model

B, T = 2, 16
SEGMENTS = np.array([[1] * 7 + [2] * 6 + [0] * 3, [1] * 16], np.int32)
# 1 on completion tokens: the last 3 of each example (the prompt's first token never is a target).
LOSS_MASK = np.array([[0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1] + [0] * 3, [0] * 10 + [1] * 6], np.int32)


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  positions = np.array([list(range(7)) + list(range(6)) + [0] * 3, list(range(16))], np.int32)
  return {"tokens": jnp.asarray(rng.randint(0, 256, (B, T)), jnp.int32), "positions": jnp.asarray(positions),
          "segment_ids": jnp.asarray(SEGMENTS), "loss_mask": jnp.asarray(LOSS_MASK)}


def _config(**fields):
  config = tiny.get_config("test")
  config.execution.moe_backend = "dropless"
  config.update(objective="sft", **fields)
  return config


def _model():
  cfg = models.from_dict(tiny.get_config("test").model.to_dict())
  return models.Transformer(cfg, rngs=nnx.Rngs(0))


class LossMaskTest(absltest.TestCase):

  def test_prompt_targets_change_neither_the_loss_nor_its_gradient(self):
    modeldef, params, bias = split_model(_model())
    batch = _batch()
    # Same inputs, different target tokens wherever the loss mask is 0 (prompt and padding).
    other = dict(batch, tokens=jnp.where(batch["loss_mask"] > 0, batch["tokens"], (batch["tokens"] + 7) % 256))

    def loss(p, targets):
      out = step_lib.forward(modeldef, p, bias, batch, with_mtp=True, execution=models.Execution())
      terms = loss_lib.loss_terms(out, targets, masked=True)
      counts = loss_lib.step_counts(targets, with_mtp=True, masked=True)
      return loss_lib.combine(terms, counts, 1, alpha=0.0, mtp_lambda=0.3)

    grad = jax.jit(jax.value_and_grad(loss))
    (l1, g1), (l2, g2) = grad(params, batch), grad(params, other)
    self.assertEqual(float(l1), float(l2))
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    # ...while without the mask the prompt targets do count: the test can fail.
    unmasked = lambda p, t: loss_lib.combine(
        loss_lib.loss_terms(step_lib.forward(modeldef, p, bias, batch, with_mtp=True,
                                             execution=models.Execution()), t),
        loss_lib.step_counts(t, with_mtp=True), 1, alpha=0.0, mtp_lambda=0.3)
    self.assertNotEqual(float(unmasked(params, batch)), float(unmasked(params, other)))

  def test_counts_are_the_completion_targets(self):
    counts = loss_lib.step_counts(_batch(), with_mtp=True, masked=True)
    # Row 0: 3 + 3 completion targets, each predicted from inside its own example; row 1: 6.
    self.assertEqual(float(counts["ce_count"]), 12.0)
    # MTP predicts t+2: a completion target whose t is in the same example (all but none here).
    self.assertEqual(float(counts["mtp_count"]), 12.0)


class LoraStepTest(absltest.TestCase):

  def test_only_adapters_train_and_the_base_stays_bit_identical(self):
    config = _config(lora=dict(tiny.get_config("test").lora.to_dict(), rank=4))
    modeldef, params, bias = split_model(_model())
    lora_cfg = lora.LoraConfig.from_dict(config.lora)
    plan = lora.plan(modeldef.params_template, lora_cfg)
    tx = optim_lib.make_optimizer(config.optim, config.total_steps)
    schedule = optim_lib.learning_rate_schedule(config.optim, config.total_steps)
    adapters = lora.init_adapters(plan, jax.random.key(0))
    base = jax.tree.map(jnp.copy, params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=adapters, router_bias=bias,
                       opt_state=tx.init(adapters), base_params=base)
    step = jax.jit(step_lib.make_train_step(modeldef, tx, schedule, config))
    for _ in range(3):
      state, metrics = step(state, _batch())
    jax.tree.map(np.testing.assert_array_equal, state.base_params, params)
    self.assertEqual(jax.tree.structure(state.params), jax.tree.structure(adapters))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(adapters))]
    self.assertTrue(all(moved))  # every A and B moved (B from its zero init)
    self.assertTrue(np.isfinite(float(metrics["train/loss"])))


if __name__ == "__main__":
  absltest.main()
