"""training/step.py + loss.py: gradient accumulation, packed-batch losses, the router-bias rule, MTP.

One jitted train step (and its grad_accum_steps=2 twin) runs once per session on a hand-made packed
batch; the tests compare its outputs with sums computed here in numpy from the model's own logits
and expert loads (one jitted forward pass on the same parameters).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx
from flax import serialization

import models
import train_testlib
from configs import tiny
from training import loss as loss_lib
from training import optimizer as optim_lib
from training import step as step_lib
from training.state import ModelDef, TrainState

B, T = 4, 16
# Packed rows: documents numbered from 1 within a row, 0 = padding; positions restart per document.
SEGMENTS = np.array([
    [1] * 9 + [2] * 5 + [0] * 2,  # two documents, then padding
    [1] * 16,  # one document filling the row
    [1] * 4 + [2] * 2 + [3] * 10,  # a two-token document in the middle
    [1] * 12 + [0] * 4,  # one document, then padding
], np.int32)


def _positions(segments):
  pos = np.zeros_like(segments)
  for r, row in enumerate(segments):
    for t in range(1, len(row)):
      pos[r, t] = pos[r, t - 1] + 1 if row[t] == row[t - 1] else 0
  return pos


def _config(grad_accum_steps=1):
  config = tiny.get_config("test")
  # Dropless routing: with the capacity backend the dropped tokens depend on the microbatch size, so
  # accumulation could not be exact.
  config.execution.moe_backend = "dropless"
  config.grad_accum_steps = grad_accum_steps
  # Adam's first step is lr·g/(|g| + eps): with eps = 1e-8 a gradient that is ~0 up to rounding moves
  # its weight by up to lr, so accumulation order alone could differ by ~lr. eps = 1e-3 keeps the
  # update Lipschitz in the gradient without changing what is being tested.
  config.optim.eps = 1e-3
  return config


def _initial_state(modeldef, tx, std):
  """A TrainState with N(0, std) weights, unit norm scales and zero router biases drawn on the host
  (a jitted random init costs as much compile time as the train step)."""
  rng = np.random.RandomState(0)
  def draw(path, leaf):
    if str(getattr(path[-1], "key", "")) == "scale":
      return np.ones(leaf.shape, np.float32)
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(modeldef.params_template))
  router_bias = jax.tree.map(lambda b: np.zeros(b.shape, np.float32), nnx.to_pure_dict(modeldef.bias_template))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, router_bias=router_bias,
                    opt_state=jax.jit(tx.init)(params))


def _compute(path):
  config = _config()
  model_cfg = models.from_dict(config.model.to_dict())
  tx = optim_lib.make_optimizer(config.optim, config.total_steps)
  schedule = optim_lib.learning_rate_schedule(config.optim, config.total_steps)
  modeldef = ModelDef.abstract(model_cfg)
  state = _initial_state(modeldef, tx, model_cfg.init_std)
  rng = np.random.RandomState(0)
  tokens = np.where(SEGMENTS > 0, rng.randint(1, model_cfg.vocab_size, (B, T)), 0).astype(np.int32)
  batch = {"tokens": tokens, "segment_ids": SEGMENTS, "positions": _positions(SEGMENTS)}

  def forward(params, router_bias, batch):
    out = modeldef.merge(params, router_bias).forward(batch["tokens"], batch["positions"],
                                                      batch["segment_ids"], with_mtp=True)
    return {"logits": out.logits, "mtp_logits": out.mtp_logits, "load": out.aux["expert_load"],
            "mtp_load": out.mtp_aux["expert_load"],
            "balance": jnp.sum(out.aux["balance_loss"]) + jnp.sum(out.mtp_aux["balance_loss"])}

  results = {"batch": batch, "before": state, "forward": jax.jit(forward)(state.params, state.router_bias, batch)}
  for accum in (1, 2):
    config = _config(accum)
    step = jax.jit(step_lib.make_train_step(modeldef, tx, schedule, config,
                                            models.execution_from_dict(config.execution)))
    results[f"accum{accum}"] = step(state, batch)
  # Plain nested dicts of arrays in msgpack (flax.serialization): no pickle, even for a test's scratch.
  (path / "results.msgpack").write_bytes(serialization.msgpack_serialize(
      serialization.to_state_dict(jax.device_get(results))))


def _state(d: dict) -> TrainState:
  return TrainState(step=d["step"], params=d["params"], router_bias=d["router_bias"], opt_state=d["opt_state"])


def _results():
  raw = serialization.msgpack_restore(
      (train_testlib.once("step_results", _compute) / "results.msgpack").read_bytes())
  out = {"batch": raw["batch"], "forward": raw["forward"], "before": _state(raw["before"])}
  for accum in ("accum1", "accum2"):  # (state, metrics) pairs, stored as {"0": ..., "1": ...}
    out[accum] = (_state(raw[accum]["0"]), raw[accum]["1"])
  return out


def _nll(logits, target):
  logits = np.asarray(logits, np.float64)
  return np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[target]


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class GradAccumulationTest(absltest.TestCase):

  def test_two_microbatches_equal_one_batch(self):
    r = _results()
    (state1, m1), (state2, m2) = r["accum1"], r["accum2"]
    for key in ("train/loss", "train/ce", "train/mtp_ce", "train/balance_loss", "train/grad_norm"):
      np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(m2["train/tokens"], m1["train/tokens"])
    before, p1, p2 = _flat(r["before"].params), _flat(state1.params), _flat(state2.params)
    diff = max(np.max(np.abs(p1[k] - p2[k])) for k in p1)
    moved = min(np.max(np.abs(p1[k] - before[k])) for k in p1)
    self.assertLess(diff, 1e-5)
    self.assertGreater(moved, 1e-4, "some parameter did not move: the comparison would be vacuous")
    for k, v in _flat(state1.router_bias).items():
      np.testing.assert_array_equal(_flat(state2.router_bias)[k], v, err_msg=k)
    self.assertEqual(int(state1.step), 1)
    self.assertEqual(int(state2.step), 1)


class PackedLossTest(absltest.TestCase):

  def test_target_mask(self):
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_array_equal(loss_lib.target_mask(segments, 1), [
        [1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 1]])
    np.testing.assert_array_equal(loss_lib.target_mask(segments, 2), [
        [1, 0, 0, 0, 0], [0, 1, 0, 0, 1]])

  def test_next_token_loss_skips_document_boundaries_and_padding(self):
    r = _results()
    tokens, segs, logits = r["batch"]["tokens"], r["batch"]["segment_ids"], r["forward"]["logits"]
    terms = [_nll(logits[b, t], tokens[b, t + 1]) for b in range(B) for t in range(T - 1)
             if segs[b, t] == segs[b, t + 1] != 0]
    _, m = r["accum1"]
    self.assertEqual(len(terms), 8 + 4 + 15 + 3 + 1 + 9 + 11)
    self.assertEqual(float(m["train/tokens"]), len(terms))
    np.testing.assert_allclose(m["train/ce"], np.mean(terms), rtol=1e-5)
    # Counting the cross-document and padding targets too would give a clearly different number.
    every = [_nll(logits[b, t], tokens[b, t + 1]) for b in range(B) for t in range(T - 1)]
    self.assertGreater(abs(np.mean(every) - np.mean(terms)), 1e-3)

  def test_mtp_loss_predicts_two_ahead_within_a_document(self):
    r = _results()
    tokens, segs, mtp = r["batch"]["tokens"], r["batch"]["segment_ids"], r["forward"]["mtp_logits"]
    self.assertEqual(mtp.shape[:2], (B, T - 1))  # row t predicts token t+2
    terms = [_nll(mtp[b, t], tokens[b, t + 2]) for b in range(B) for t in range(T - 2)
             if segs[b, t] == segs[b, t + 2] != 0]
    _, m = r["accum1"]
    self.assertEqual(len(terms), 7 + 3 + 14 + 2 + 0 + 8 + 10)
    np.testing.assert_allclose(m["train/mtp_ce"], np.mean(terms), rtol=1e-5)
    off_by_one = [_nll(mtp[b, t], tokens[b, t + 1]) for b in range(B) for t in range(T - 2)
                  if segs[b, t] == segs[b, t + 2] != 0]
    self.assertGreater(abs(np.mean(off_by_one) - np.mean(terms)), 1e-3)

  def test_total_loss_combines_the_terms(self):
    r = _results()
    _, m = r["accum1"]
    config = _config()
    expected = (m["train/ce"] + config.loss.mtp_lambda * m["train/mtp_ce"]
                + config.loss.balance_alpha * r["forward"]["balance"])
    np.testing.assert_allclose(m["train/loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(m["train/balance_loss"], r["forward"]["balance"], rtol=1e-5)


class RouterBiasTest(absltest.TestCase):

  def test_update_rule_on_hand_made_loads(self):
    bias = {"moe_layers": {"ffn": {"router": {"bias": jnp.array([[0.5, 0.5, 0.5, 0.5], [0., 0., 0., 0.]])}}}}
    loads = {"moe_layers": jnp.array([[3., 1., 2., 2.], [0., 0., 0., 8.]])}
    new = step_lib.update_router_bias(bias, loads, 0.25)["moe_layers"]["ffn"]["router"]["bias"]
    np.testing.assert_array_equal(new, [[0.25, 0.75, 0.5, 0.5], [0.25, 0.25, 0.25, -0.25]])

  def test_train_step_moves_each_bias_by_gamma_towards_balance(self):
    r = _results()
    gamma = np.float32(_config().loss.bias_update_speed)
    state, m = r["accum1"]
    for name, load, new, old, load_key in [
        ("moe_layers", r["forward"]["load"], state.router_bias["moe_layers"]["ffn"]["router"]["bias"],
         r["before"].router_bias["moe_layers"]["ffn"]["router"]["bias"], "moe/moe_layers/expert_load"),
        ("mtp", r["forward"]["mtp_load"], state.router_bias["mtp"]["block"]["ffn"]["router"]["bias"],
         r["before"].router_bias["mtp"]["block"]["ffn"]["router"]["bias"], "moe/mtp/expert_load")]:
      sign = np.sign(load.mean(axis=-1, keepdims=True) - load)
      self.assertTrue(np.any(sign > 0) and np.any(sign < 0), f"{name}: loads {load} are uninformative")
      np.testing.assert_array_equal(new - old, (gamma * sign).astype(np.float32), err_msg=name)
      # The step's load metric is the same routing's counts.
      np.testing.assert_array_equal(m[load_key], load)

  def test_router_bias_is_not_an_optimizer_parameter(self):
    r = _results()
    params_paths = " ".join(_flat(r["before"].params))
    opt_paths = " ".join(_flat(r["before"].opt_state))
    self.assertIn("['router']['kernel']", params_paths)
    self.assertNotIn("['router']['bias']", params_paths)
    self.assertNotIn("['router']['bias']", opt_paths)
    # Weight decay does not reach it either: with loads fixed it moves by exactly ±γ or 0 (tested above)
    # from its initial zeros.
    for v in _flat(r["before"].router_bias).values():
      np.testing.assert_array_equal(v, 0.0)


if __name__ == "__main__":
  absltest.main()
