"""training/optimizer.py: the warmup–constant–cosine schedule, the weight-decay mask, AdamW + clipping."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

import models
from configs import tiny
from training import optimizer as optim_lib
from training import state as state_lib


def _optim(**overrides) -> ml_collections.ConfigDict:
  optim = tiny.get_config("test").optim
  optim.update(overrides)
  return optim


def _params_and_biases(value: float = 0.5):
  """Real parameter and router-bias pure dicts of a tiny model with attention and MLP biases, filled with
  `value` (built abstractly: the structure is what matters, and nothing needs compiling)."""
  config = tiny.get_config("test")
  config.model.update(attention_bias=True, mlp_bias=True)
  model_cfg = models.from_dict(config.model.to_dict())
  modeldef = state_lib.ModelDef.abstract(model_cfg)
  fill = lambda s: jnp.full(s.shape, value, s.dtype)
  return (jax.tree.map(fill, nnx.to_pure_dict(modeldef.params_template)),
          jax.tree.map(fill, nnx.to_pure_dict(modeldef.bias_template)))


def _flat(tree) -> dict:
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class ScheduleTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # warmup = 10 steps, constant until step 50, cosine over 50 steps to 0.1.
    optim = _optim(peak_lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1, decay_start_fraction=0.5)
    self.lr = optim_lib.learning_rate_schedule(optim, total_steps=100)

  @parameterized.parameters(
      (0, 0.1), (4, 0.5), (9, 1.0),  # linear warmup: step s trains with peak·(s+1)/warmup
      (10, 1.0), (30, 1.0), (49, 1.0), (50, 1.0),  # constant
      (60, 0.1 + 0.45 * (1 + math.cos(0.2 * math.pi))),  # cosine
      (75, 0.55), (99, 0.1 + 0.45 * (1 + math.cos(0.98 * math.pi))),
      (100, 0.1), (150, 0.1),  # min_lr_ratio·peak at total_steps, and after it
  )
  def test_hand_computed_values(self, step, expected):
    np.testing.assert_allclose(float(self.lr(step)), expected, rtol=1e-6)

  def test_monotone_after_warmup_and_exact_floor(self):
    lrs = np.asarray([float(self.lr(s)) for s in range(10, 101)])
    self.assertTrue(np.all(np.diff(lrs) <= 1e-7), "the schedule rises after the warmup")
    self.assertEqual(float(self.lr(100)), np.float32(0.1))
    self.assertGreater(float(self.lr(99)), 0.1)

  def test_a_six_step_run(self):
    # The e2e tests' schedule: warmup round(0.3) -> 1 step, decay from round(3.0) = 3 over 3 steps.
    optim = _optim(peak_lr=3e-3, min_lr_ratio=0.1, warmup_fraction=0.05, decay_start_fraction=0.5)
    lr = optim_lib.learning_rate_schedule(optim, total_steps=6)
    peak, floor = 3e-3, 3e-4
    cos = lambda p: floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    expected = [peak, peak, peak, peak, cos(1 / 3), cos(2 / 3), floor]
    np.testing.assert_allclose([float(lr(s)) for s in range(7)], expected, rtol=1e-6)

  def test_short_warmup_rounds_up_to_one_step(self):
    lr = optim_lib.learning_rate_schedule(_optim(peak_lr=1.0, warmup_fraction=0.001), total_steps=10)
    self.assertEqual(float(lr(0)), 1.0)

  def test_jit_and_array_steps(self):
    steps = jnp.arange(0, 101, 25)
    np.testing.assert_allclose(jax.jit(self.lr)(steps), [float(self.lr(int(s))) for s in steps], rtol=1e-6)


class DecayMaskTest(absltest.TestCase):

  def test_excludes_norm_scales_and_biases_includes_matrices(self):
    params, router_bias = _params_and_biases()
    mask = _flat(optim_lib.decay_mask(params))
    shapes = {path: leaf.shape for path, leaf in _flat(params).items()}
    for path, decays in mask.items():
      name = path[-1]
      expected = not (name == "scale" or name.endswith("bias") or len(shapes[path]) <= 1)
      self.assertEqual(decays, expected, f"{'/'.join(path)} {shapes[path]}")
    # The cases that make the rule matter: stacked ([L, ...]) norm scales and biases are 2-D, so the
    # names, not the ranks, must exclude them.
    for path in [("moe_layers", "attn_norm", "scale"), ("dense_layers", "attn", "kv_norm", "scale"),
                 ("moe_layers", "ffn", "shared", "down_bias"), ("dense_layers", "attn", "wo_bias"),
                 ("final_norm", "scale"), ("mtp", "block", "attn", "wq_a_bias")]:
      self.assertIn(path, mask)
      self.assertFalse(mask[path], path)
    self.assertEqual(len(shapes[("moe_layers", "attn_norm", "scale")]), 2)
    for path in [("embed",), ("lm_head",), ("moe_layers", "ffn", "experts", "gate"),
                 ("moe_layers", "ffn", "router", "kernel"), ("dense_layers", "attn", "wq_a"),
                 ("mtp", "eh_proj")]:
      self.assertTrue(mask[path], path)
    # The aux-loss-free router bias is not a parameter at all: no decay, no optimizer state.
    self.assertNotIn(("moe_layers", "ffn", "router", "bias"), mask)
    self.assertIn(("moe_layers", "ffn", "router", "bias"), _flat(router_bias))

  def test_weight_decay_applies_exactly_where_the_mask_says(self):
    params, _ = _params_and_biases(0.5)
    optim = _optim(peak_lr=2.0, weight_decay=0.1, warmup_fraction=0.0)  # lr(0) = peak
    tx = optim_lib.make_optimizer(optim, total_steps=10)
    updates = _first_update(tx, jax.tree.map(jnp.zeros_like, params), params)  # only decay moves
    mask = _flat(optim_lib.decay_mask(params))
    for path, update in _flat(updates).items():
      expected = -2.0 * 0.1 * 0.5 if mask[path] else 0.0
      np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg="/".join(path))


def _first_update(tx, grads, params):
  """tx's first update, all in one jit (one compile instead of one per op and shape)."""
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def _random_grads(params, norm: float):
  rng = np.random.RandomState(0)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in jax.tree.leaves(grads)))
  return jax.tree.map(lambda g: g * np.float32(norm / total), grads)


class ClippingTest(parameterized.TestCase):

  @parameterized.parameters((1000.0, 1.0), (1000.0, 0.25), (0.5, 1.0))
  def test_first_update_norm_is_bounded_by_lr_times_clip_norm(self, grad_norm, clip_norm):
    # With eps = 1 Adam's first step is lr·g/(|g| + 1): about lr·g for the small per-element clipped
    # gradients, so ||update|| ≈ lr·min(||g||, clip_norm); unclipped, ||g|| = 1000 would give ~lr·sqrt(n).
    params, _ = _params_and_biases(0.5)
    # A few real leaves (the embedding, a matrix, a norm scale) keep the compile short.
    params = {"embed": params["embed"], "mtp": {"eh_proj": params["mtp"]["eh_proj"]},
              "final_norm": params["final_norm"]}
    lr = 0.01
    optim = _optim(peak_lr=lr, weight_decay=0.0, eps=1.0, clip_norm=clip_norm, warmup_fraction=0.0)
    tx = optim_lib.make_optimizer(optim, total_steps=10)
    updates = _first_update(tx, _random_grads(params, grad_norm), params)
    norm = float(optax.tree.norm(updates))
    bound = lr * min(grad_norm, clip_norm)
    self.assertLessEqual(norm, bound * (1 + 1e-5))
    self.assertGreater(norm, 0.9 * bound)
    chex.assert_tree_all_finite(updates)


class LoraPlusTest(absltest.TestCase):

  def test_b_matrices_take_the_ratio_times_the_learning_rate(self):
    adapters = {"attn": {"wq_a": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}}
    optim = _optim(peak_lr=0.01, weight_decay=0.0, warmup_fraction=0.0)
    grads = jax.tree.map(lambda x: 0.5 * x, adapters)
    plain = _first_update(optim_lib.make_optimizer(optim, total_steps=10), grads, adapters)
    plus = _first_update(optim_lib.make_optimizer(optim, total_steps=10, lora_b_lr_ratio=16.0), grads, adapters)
    a, b = plain["attn"]["wq_a"]["a"], plain["attn"]["wq_a"]["b"]
    np.testing.assert_allclose(np.asarray(plus["attn"]["wq_a"]["a"]), np.asarray(a), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(plus["attn"]["wq_a"]["b"]), 16.0 * np.asarray(b), rtol=1e-6)
    self.assertLess(float(b[0, 0]), 0.0)  # a real (descending) update, not zero


class MomentDtypeTest(absltest.TestCase):

  def _grads(self, steps: int):
    rng = np.random.default_rng(0)
    return [{"w": jnp.asarray(rng.normal(0.0, 1e-2, (8, 5)), jnp.float32),
             "scale": jnp.asarray(rng.normal(0.0, 1e-3, (5,)), jnp.float32)} for _ in range(steps)]

  def _run(self, tx, steps: int = 6):
    params = {"w": jnp.full((8, 5), 0.5), "scale": jnp.ones((5,))}
    state = tx.init(params)
    updates = []
    for grads in self._grads(steps):
      u, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, u)
      updates.append(u)
    return params, state, updates

  def test_float32_storage_is_optax_adam(self):
    ours = optim_lib.scale_by_adam(0.9, 0.95, 1e-8, "float32")
    _, state, updates = self._run(ours)
    _, ref_state, ref_updates = self._run(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8))
    for u, r in zip(updates, ref_updates):
      chex.assert_trees_all_close(u, r, rtol=1e-6, atol=1e-9)
    chex.assert_trees_all_close(state.nu, ref_state.nu, rtol=1e-6)
    self.assertEqual(int(state.count), 6)

  def test_bfloat16_moments_track_the_float32_run(self):
    optim = _optim(peak_lr=0.01, warmup_fraction=0.0, moment_dtype="bfloat16")
    params, state, _ = self._run(optim_lib.make_optimizer(optim, total_steps=10), steps=10)
    adam_state = state[1][0]
    self.assertEqual({x.dtype for x in jax.tree.leaves((adam_state.mu, adam_state.nu))}, {jnp.dtype(jnp.bfloat16)})
    ref_params, _, _ = self._run(optim_lib.make_optimizer(_optim(peak_lr=0.01, warmup_fraction=0.0), 10), steps=10)
    start = {"w": jnp.full((8, 5), 0.5), "scale": jnp.ones((5,))}
    moved = jax.tree.map(lambda p, s: float(jnp.max(jnp.abs(p - s))), ref_params, start)
    err = jax.tree.map(lambda p, r: float(jnp.max(jnp.abs(p - r))), params, ref_params)
    for name in moved:
      self.assertGreater(moved[name], 0.01)  # ten real steps of lr 0.01
      self.assertLess(err[name], 0.01 * moved[name])  # bf16 storage: within 1 % of the displacement

  def test_unknown_moment_dtype_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "moment_dtype"):
      optim_lib.make_optimizer(_optim(moment_dtype="float16"), total_steps=10)


if __name__ == "__main__":
  absltest.main()
