"""LoRA on the pure params (models/lora.py): targets and layouts, the exact zero init, the merged update,
gradients to the adapters, rank dropout and config errors, on the tiny "test" model."""

import functools
import zlib

from tests.models import tiny_configs as tc  # noqa: I001  (sets the fast-compile XLA flag first)

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from configs import tiny
from models import lora
from training.state import ModelDef, split_model

B, T = 2, 12
CFG = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.WITH_ROUTED_EXPERTS)  # every kind of adapted weight


@functools.cache
def _setup():
  """(modeldef, params, router_bias) of the tiny test model with seeded weights."""
  cfg = models.from_dict(tiny.get_config("test").model.to_dict())
  return split_model(tc.build(cfg, seed=0))


def _ids():
  return jnp.asarray(tc.random_ids(_setup()[0].cfg, (B, T), seed=1))


@functools.cache
def _forward_fn():
  modeldef, _, bias = _setup()

  def forward(params, ids):  # the default Execution: dropless experts (ragged_dot), scanned stacks
    out = modeldef.merge(params, bias).forward(ids, with_mtp=True)
    return out.logits, out.mtp_logits
  return jax.jit(forward)


def _forward(params):
  """(logits [B, T, V], mtp_logits [B, T-1, V]) of the model with `params`."""
  return _forward_fn()(params, _ids())


def _plan(cfg=CFG):
  return lora.plan(_setup()[0].params_template, cfg)


def _random_b(adapters, seed=0, std=0.1):
  """The adapters with every B drawn from normal(0, std) instead of zero."""
  key = jax.random.key(seed)

  def visit(node, keys):
    if set(node) == {"a", "b"}:
      b = std * jax.random.normal(jax.random.fold_in(key, zlib.crc32("/".join(keys).encode())), node["b"].shape)
      return {"a": node["a"], "b": b}
    return {k: visit(v, (*keys, k)) for k, v in node.items()}
  return visit(adapters, ())


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in p) for p, _ in flat}


class TargetsTest(absltest.TestCase):

  def test_default_targets_select_projections_and_ffns(self):
    attn = [f"attn/{w}" for w in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")]
    ffn = lambda prefix: [f"{prefix}/{w}" for w in ("gate", "up", "down")]
    default = {f"dense_layers/{p}" for p in attn + ffn("ffn")}
    for stack in ("moe_layers", "mtp/block"):
      default |= {f"{stack}/{p}" for p in attn + ffn("ffn/shared")}
    routed = {f"{stack}/{p}" for stack in ("moe_layers", "mtp/block") for p in ffn("ffn/experts")}
    self.assertEqual(set(_plan(lora.LoraConfig(rank=4, alpha=8.0))), default)
    self.assertEqual(set(_plan()), default | routed)  # WITH_ROUTED_EXPERTS
    for path in _plan():
      for excluded in ("embed", "lm_head", "norm", "router", "eh_proj"):
        self.assertNotIn(excluded, path.split("/"))

  def test_default_targets_include_the_single_wq_projection(self):
    modeldef = ModelDef.abstract(tc.v2_lite_style())  # q_lora_rank=None: attn/wq [D, H, K]
    spec = lora.plan(modeldef.params_template, CFG)["moe_layers/attn/wq"]
    self.assertEqual((spec.a_shape, spec.b_shape), ((2, 32, 4), (2, 4, 2, 16)))

  def test_adapter_layout_per_layer_and_expert(self):
    plan = _plan()
    # (A shape, B shape, A axes, B axes); tiny test: D 32, 4 heads, Kv 8, q/kv latent 16, F 64, expert F 16.
    expected = {
        "dense_layers/attn/wq_a": ((1, 32, 4), (1, 4, 16), ("layers", "embed", None), ("layers", None, "q_lora")),
        "moe_layers/attn/wkv_b": ((2, 16, 4), (2, 4, 4, 16), ("layers", "kv_lora", None),
                                  ("layers", None, "heads", "kv")),
        "moe_layers/attn/wo": ((2, 4, 8, 4), (2, 4, 32), ("layers", "heads", "kv", None), ("layers", None, "embed")),
        "dense_layers/ffn/down": ((1, 64, 4), (1, 4, 32), ("layers", "mlp", None), ("layers", None, "embed")),
        "moe_layers/ffn/experts/gate": ((2, 8, 32, 4), (2, 8, 4, 16), ("layers", "expert", "embed", None),
                                        ("layers", "expert", None, "moe_mlp")),
        "moe_layers/ffn/experts/down": ((2, 8, 16, 4), (2, 8, 4, 32), ("layers", "expert", "moe_mlp", None),
                                        ("layers", "expert", None, "embed")),
        "mtp/block/ffn/experts/up": ((8, 32, 4), (8, 4, 16), ("expert", "embed", None), ("expert", None, "moe_mlp")),
        "mtp/block/attn/wo": ((4, 8, 4), (4, 32), ("heads", "kv", None), (None, "embed")),
    }
    for path, (a_shape, b_shape, a_axes, b_axes) in expected.items():
      spec = plan[path]
      self.assertEqual((spec.a_shape, spec.b_shape, spec.a_axes, spec.b_axes), (a_shape, b_shape, a_axes, b_axes),
                       path)
    adapters = lora.init_adapters(plan, jax.random.key(0))
    axes = lora.adapter_axes(plan)
    for path, spec in plan.items():
      chex.assert_shape(_get(adapters, path)["a"], spec.a_shape)
      chex.assert_shape(_get(adapters, path)["b"], spec.b_shape)
      self.assertEqual(_get(axes, path), {"a": spec.a_axes, "b": spec.b_axes})
    self.assertEqual(lora.count_params(adapters),
                     sum(np.prod(s.a_shape) + np.prod(s.b_shape) for s in plan.values()))

  def test_init_is_kaiming_uniform_a_and_zero_b(self):
    plan = _plan(lora.LoraConfig(rank=16, alpha=16.0, targets=lora.WITH_ROUTED_EXPERTS))
    adapters = lora.init_adapters(plan, jax.random.key(0))
    spec = plan["moe_layers/ffn/experts/gate"]
    a = np.asarray(_get(adapters, "moe_layers/ffn/experts/gate")["a"])
    bound = 1 / np.sqrt(spec.in_size)
    self.assertLessEqual(np.abs(a).max(), bound)
    self.assertGreater(np.abs(a).max(), 0.9 * bound)
    self.assertFalse(np.array_equal(a[0, 0], a[0, 1]))  # experts differ
    self.assertFalse(np.array_equal(a[0], a[1]))  # layers differ
    for path in plan:
      self.assertFalse(np.any(np.asarray(_get(adapters, path)["b"])))


class ApplyTest(absltest.TestCase):

  def test_zero_init_is_bit_identical(self):
    _, params, _ = _setup()
    adapters = lora.init_adapters(_plan(), jax.random.key(0))
    merged = lora.apply(params, adapters, CFG)
    self.assertEqual(jax.tree.structure(merged), jax.tree.structure(params))
    for path in _paths(params):
      w, w2 = np.asarray(_get(params, path)), np.asarray(_get(merged, path))
      self.assertEqual(w2.dtype, w.dtype)
      np.testing.assert_array_equal(w2.view(np.uint32), w.view(np.uint32), err_msg=path)
      if path not in _plan():
        self.assertIs(_get(merged, path), _get(params, path))
    base_out, merged_out = _forward(params), _forward(merged)
    for base, new in zip(base_out, merged_out):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(base))

  def test_a_bfloat16_base_merges_in_float32(self):
    _, params, _ = _setup()
    base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    merge = jax.jit(functools.partial(lora.merge, cfg=CFG))
    adapters = lora.init_adapters(_plan(), jax.random.key(0))
    merged = merge(base, adapters)
    for path in _plan():  # zero init: exactly the bf16 values, widened
      w, w2 = _get(base, path), _get(merged, path)
      self.assertEqual(w2.dtype, jnp.float32)
      np.testing.assert_array_equal(np.asarray(w2), np.asarray(w).astype(np.float32))
    # An update far below bf16's resolution of the weight survives (rounding to bf16 would erase it).
    tiny_b = jax.tree.map(lambda x: x, adapters)
    path = next(iter(_plan()))
    node = _get(tiny_b, path)
    node["b"] = jnp.full_like(node["b"], 1e-6)
    changed = _get(merge(base, tiny_b), path)
    self.assertFalse(np.array_equal(np.asarray(changed), np.asarray(_get(base, path)).astype(np.float32)))

  def test_merged_weight_is_the_low_rank_update(self):
    _, params, _ = _setup()
    adapters = _random_b(lora.init_adapters(_plan(), jax.random.key(0)))
    merged = lora.apply(params, adapters, CFG)
    hi = dict(precision=jax.lax.Precision.HIGHEST)
    x = jax.random.normal(jax.random.key(2), (5, 4, 8))  # rows into wo: [N, H, Kv]
    for layer in range(2):
      w, w2 = _get(params, "moe_layers/attn/wo")[layer], _get(merged, "moe_layers/attn/wo")[layer]
      ad = _get(adapters, "moe_layers/attn/wo")
      want = (jnp.einsum("nhk,hkd->nd", x, w, **hi)
              + CFG.scale * jnp.einsum("nhk,hkr,rd->nd", x, ad["a"][layer], ad["b"][layer], **hi))
      np.testing.assert_allclose(jnp.einsum("nhk,hkd->nd", x, w2, **hi), want, atol=1e-5, rtol=1e-5)
    x = jax.random.normal(jax.random.key(3), (5, 32))  # rows into an expert's gate: [N, D]
    ad = _get(adapters, "moe_layers/ffn/experts/gate")
    for layer, expert in [(0, 0), (1, 5)]:
      w = _get(params, "moe_layers/ffn/experts/gate")[layer, expert]
      w2 = _get(merged, "moe_layers/ffn/experts/gate")[layer, expert]
      want = jnp.dot(x, w, **hi) + CFG.scale * jnp.dot(jnp.dot(x, ad["a"][layer, expert], **hi),
                                                       ad["b"][layer, expert], **hi)
      np.testing.assert_allclose(jnp.dot(x, w2, **hi), want, atol=1e-5, rtol=1e-5)

  def test_merged_model_differs_from_base(self):
    _, params, _ = _setup()
    merged = lora.merge(params, _random_b(lora.init_adapters(_plan(), jax.random.key(0))), CFG)
    for base, new in zip(_forward(params), _forward(merged)):
      chex.assert_tree_all_finite(new)
      self.assertGreater(float(jnp.max(jnp.abs(new - base))), 1e-3)

  def test_rank_mismatch_and_missing_weight_are_errors(self):
    _, params, _ = _setup()
    adapters = lora.init_adapters(_plan(), jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "rank 4, the config says 8"):
      lora.apply(params, adapters, lora.LoraConfig(rank=8, alpha=8.0))
    with self.assertRaisesRegex(ValueError, "no weight in the base"):
      lora.apply({"embed": params["embed"]}, adapters, CFG)


class GradientTest(absltest.TestCase):

  def test_gradients_reach_the_adapters_only(self):
    _, params, _ = _setup()
    ids = _ids()

    def loss(adapters):
      logits, mtp_logits = _forward(lora.apply(params, adapters, CFG))
      xent = lambda lg, tg: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tg[..., None], axis=-1))
      return xent(logits[:, :-1], ids[:, 1:]) + xent(mtp_logits[:, :-1], ids[:, 2:])

    grad = jax.jit(jax.grad(loss))
    adapters = lora.init_adapters(_plan(), jax.random.key(0))
    g = grad(adapters)
    self.assertEqual(jax.tree.structure(g), jax.tree.structure(adapters))
    for path in _plan():
      ga, gb = _get(g, path)["a"], _get(g, path)["b"]
      self.assertFalse(np.any(np.asarray(ga)), f"{path}: dA must be 0 while B is 0")
      self.assertGreater(float(jnp.max(jnp.abs(gb))), 0, f"{path}: no gradient reaches B")
    # Per layer: both layers of the MoE stack get their own nonzero gradient.
    gb = _get(g, "moe_layers/attn/wq_b")["b"]
    self.assertTrue(all(float(jnp.max(jnp.abs(gb[l]))) > 0 for l in range(2)))
    g = grad(_random_b(adapters))
    for path in _plan():
      self.assertGreater(float(jnp.max(jnp.abs(_get(g, path)["a"]))), 0, f"{path}: no gradient reaches A")


class GradientInitTest(absltest.TestCase):
  """lora.init = "gradient": A along the top singular directions of the base's gradient, B still 0."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _, params, _ = _setup()
    ids = _ids()

    def loss(p):
      logits, _ = _forward(p)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1))

    cls.grads = jax.jit(jax.grad(loss))(params)
    cls.random = lora.init_adapters(_plan(), jax.random.key(0))
    cls.aligned = lora.gradient_aligned(_plan(), cls.random, cls.grads)
    cls.loss = staticmethod(loss)

  def _matrices(self, path):
    spec = _plan()[path]
    stack = spec.weight_shape[:spec.n_stack]
    g = np.asarray(_get(self.grads, path), np.float64).reshape(-1, spec.in_size, int(np.prod(spec.weight_shape)) //
                                                                max(int(np.prod(stack)), 1) // spec.in_size)
    a = np.asarray(_get(self.aligned, path)["a"], np.float64).reshape(-1, spec.in_size, spec.rank)
    return g, a

  def test_b_stays_zero_so_the_model_is_the_base(self):
    _, params, _ = _setup()
    for path in _plan():
      np.testing.assert_array_equal(np.asarray(_get(self.aligned, path)["b"]), 0.0)
      self.assertEqual(_get(self.aligned, path)["a"].shape, _get(self.random, path)["a"].shape)
    for base, new in zip(_forward(params), _forward(lora.apply(params, self.aligned, CFG))):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(base))

  def test_a_spans_the_top_singular_directions_of_the_gradient(self):
    for path in ("moe_layers/attn/wq_b", "moe_layers/attn/wo", "moe_layers/ffn/experts/gate", "dense_layers/ffn/down"):
      g, a = self._matrices(path)
      for g_m, a_m in zip(g, a):
        # Orthogonal columns with the default init's norm √(1/3).
        np.testing.assert_allclose(a_m.T @ a_m, np.eye(a_m.shape[1]) / 3.0, atol=1e-5, err_msg=path)
        s = np.linalg.svd(g_m, compute_uv=False)
        captured = np.sum((a_m.T @ g_m) ** 2) * 3.0  # energy of G in span(A)
        np.testing.assert_allclose(captured, np.sum(s[:a_m.shape[1]] ** 2), rtol=1e-4, err_msg=path)

  def test_the_first_b_gradient_is_larger_than_with_random_a(self):
    _, params, _ = _setup()
    grad_b = lambda adapters: jax.grad(lambda ad: self.loss(lora.apply(params, ad, CFG)))(adapters)
    g_aligned, g_random = grad_b(self.aligned), grad_b(self.random)
    norm = lambda g: float(sum(jnp.sum(_get(g, p)["b"] ** 2) for p in _plan()))
    self.assertGreater(norm(g_aligned), 3.0 * norm(g_random))

  def test_bad_init_name(self):
    with self.assertRaisesRegex(ValueError, "init must be one of"):
      lora.LoraConfig(rank=4, alpha=8.0, init="pissa")


class RankDropoutTest(absltest.TestCase):

  def test_drops_a_fraction_p_of_rank_components(self):
    _, params, _ = _setup()
    cfg = lora.LoraConfig(rank=16, alpha=16.0, dropout=0.25, targets=lora.WITH_ROUTED_EXPERTS)
    adapters = lora.init_adapters(_plan(cfg), jax.random.key(0))
    dropped = lora.rank_dropout(params, adapters, cfg.dropout, jax.random.key(7))
    again = lora.rank_dropout(params, adapters, cfg.dropout, jax.random.key(7))
    other = lora.rank_dropout(params, adapters, cfg.dropout, jax.random.key(8))
    chex.assert_trees_all_equal(dropped, again)
    self.assertFalse(all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(dropped), jax.tree.leaves(other))))
    zeros = total = 0
    for path, spec in _plan(cfg).items():
      a, a_drop = np.asarray(_get(adapters, path)["a"]), np.asarray(_get(dropped, path)["a"])
      np.testing.assert_array_equal(_get(dropped, path)["b"], _get(adapters, path)["b"])
      in_axes = tuple(range(spec.n_stack, a.ndim - 1))
      off_SR = ~np.any(a_drop, axis=in_axes)  # a whole rank column of one layer / expert is zero
      kept = np.broadcast_to(np.expand_dims(~off_SR, in_axes), a.shape)
      np.testing.assert_allclose(a_drop[kept], a[kept] / 0.75, rtol=1e-6)
      zeros, total = zeros + off_SR.sum(), total + off_SR.size
    self.assertGreater(total, 1000)
    self.assertAlmostEqual(zeros / total, 0.25, delta=0.05)

  def test_apply_drops_only_with_an_rng(self):
    _, params, _ = _setup()
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    adapters = _random_b(lora.init_adapters(_plan(cfg), jax.random.key(0)))
    merged = lora.merge(params, adapters, cfg)
    chex.assert_trees_all_equal(lora.apply(params, adapters, cfg), merged)
    chex.assert_trees_all_equal(lora.apply(params, adapters, lora.LoraConfig(rank=4, alpha=8.0),
                                           dropout_rng=jax.random.key(1)), merged)
    with_rng = lora.apply(params, adapters, cfg, dropout_rng=jax.random.key(1))
    chex.assert_trees_all_equal(with_rng, lora.merge(params, lora.rank_dropout(params, adapters, 0.5,
                                                                               jax.random.key(1)), cfg))
    self.assertFalse(np.array_equal(_get(with_rng, "moe_layers/attn/wo"), _get(merged, "moe_layers/attn/wo")))


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("rank_zero", dict(rank=0, alpha=8.0), "rank"),
      ("rank_float", dict(rank=2.5, alpha=8.0), "rank"),
      ("negative_alpha", dict(rank=4, alpha=-1.0), "alpha"),
      ("dropout_one", dict(rank=4, alpha=8.0, dropout=1.0), "dropout"),
      ("invalid_regex", dict(rank=4, alpha=8.0, targets="attn/(wq"), "targets is not a valid regex"),
      ("empty_regex", dict(rank=4, alpha=8.0, targets=""), "targets"),
  )
  def test_bad_config(self, fields, message):
    with self.assertRaisesRegex(ValueError, message):
      lora.LoraConfig(**fields)

  def test_regex_matching_nothing(self):
    with self.assertRaisesRegex(ValueError, r"'nothing_here' match no parameter.*dense_layers/"):
      _plan(lora.LoraConfig(rank=4, alpha=8.0, targets="nothing_here"))
    with self.assertRaisesRegex(ValueError, "match no parameter"):  # norm scales are never targets
      _plan(lora.LoraConfig(rank=4, alpha=8.0, targets="norm/scale$"))

  def test_from_dict(self):
    section = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.1, targets="attn/wo$", base_dtype=""))
    cfg = lora.LoraConfig.from_dict(section)
    self.assertEqual(cfg, lora.LoraConfig(rank=8, alpha=16.0, dropout=0.1, targets="attn/wo$"))
    self.assertEqual(cfg.scale, 2.0)
    self.assertEqual(lora.LoraConfig.from_dict(dict(rank=4, alpha=4)).targets, lora.DEFAULT_TARGETS)
    self.assertEqual(set(lora.plan(_setup()[0].params_template, cfg)),
                     {"dense_layers/attn/wo", "moe_layers/attn/wo", "mtp/block/attn/wo"})


if __name__ == "__main__":
  absltest.main()
