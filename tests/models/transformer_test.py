"""Whole-model properties of `models.Transformer`: shapes, causality, packing, MTP, dtypes, remat."""

import functools

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.moe import MoE
from tests.models import tiny_configs as tc

B, T = 2, 16
STYLE_PARAMS = [dict(testcase_name=name, style=name) for name in tc.STYLES]


@functools.cache
def _model(style, **overrides):
  return tc.build(tc.STYLES[style](**overrides), seed=0)


def _logits(style, ids, positions=None, segment_ids=None):
  return _run(_model(style), ids, positions, segment_ids)


def _run(model, ids, positions=None, segment_ids=None):
  """Jitted forward; positions and segments are always passed (defaults: 0..T-1, one document) so
  every test on a style shares one compiled shape."""
  b, t = ids.shape
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1)) if positions is None else positions
  segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
  return tc.forward(model, ids, positions, segment_ids, with_mtp=bool(model.cfg.mtp_depth))


def _xent(logits_BTV, targets_BT):
  logp = jax.nn.log_softmax(logits_BTV, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets_BT[..., None], axis=-1))


def _loss(model, ids_BT, execution=None):
  """Next-token cross-entropy, plus the MTP (token i+2) cross-entropy when the model has MTP.
  Returns the logits as auxiliary output."""
  out = model.forward(ids_BT, with_mtp=bool(model.cfg.mtp_depth), execution=execution)
  loss = _xent(out.logits[:, :-1], ids_BT[:, 1:])
  if out.mtp_logits is not None:
    loss = loss + 0.3 * _xent(out.mtp_logits[:, :-1], ids_BT[:, 2:])
  return loss, out.logits


@functools.cache
def _grad_fn(cfg, execution):
  """((loss, logits), grads) for models of `cfg` under one jit (cached so tests share the compile)."""
  return nnx.jit(nnx.value_and_grad(functools.partial(_loss, execution=execution), has_aux=True))


def _grads(cfg, ids, execution=models.Execution()):
  return _grad_fn(cfg, execution)(tc.build(cfg, seed=0), jnp.asarray(ids))


def _assert_same_function(cfg, ids, execution, tol):
  """`execution` gives the default execution's loss, logits and gradients within `tol`; returns the logits."""
  (loss, logits), grads = _grads(cfg, ids)
  (other_loss, other_logits), other_grads = _grads(cfg, ids, execution)
  np.testing.assert_allclose(other_loss, loss, rtol=tol)
  chex.assert_trees_all_close(other_logits, logits, atol=tol, rtol=tol)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, other_grads), jax.tree.map(np.asarray, grads),
                              atol=tol, rtol=tol)
  return logits


class TransformerTest(chex.TestCase):

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_output_shapes_and_dtypes(self, style):
    cfg = tc.STYLES[style]()
    out = _logits(style, tc.random_ids(cfg, (B, T)))
    chex.assert_shape(out.logits, (B, T, cfg.vocab_size))
    chex.assert_shape(out.hidden, (B, T, cfg.hidden_size))
    self.assertEqual(out.logits.dtype, jnp.float32)
    chex.assert_tree_all_finite(out.logits)
    chex.assert_shape(out.aux["expert_load"], (cfg.num_moe_layers, cfg.n_routed_experts))
    chex.assert_shape(out.aux["balance_loss"], (cfg.num_moe_layers,))
    if cfg.mtp_depth:
      chex.assert_shape(out.mtp_logits, (B, T - 1, cfg.vocab_size))
      self.assertEqual(out.mtp_logits.dtype, jnp.float32)
    else:
      self.assertIsNone(out.mtp_logits)
    # Random weights must give input-dependent, non-degenerate logits.
    self.assertGreater(float(jnp.std(out.logits)), 0.1)
    self.assertFalse(np.allclose(out.logits[0], out.logits[1]))

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_causality(self, style):
    cfg = tc.STYLES[style]()
    ids = tc.random_ids(cfg, (B, T), seed=1)
    base = np.asarray(_logits(style, ids).logits)
    for j in (3, 9, T - 1):
      changed = ids.copy()
      changed[:, j] = (changed[:, j] + 1 + np.arange(B)) % cfg.vocab_size
      logits = np.asarray(_logits(style, changed).logits)
      np.testing.assert_array_equal(logits[:, :j], base[:, :j], err_msg=f"token {j} leaked backwards")
      self.assertGreater(np.abs(logits[:, j:] - base[:, j:]).max(), 1e-3, f"token {j} had no effect")

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("v3", "v3"), ("v2_lite", "v2_lite"))
  def test_jit_matches_eager(self, style):
    model = _model(style)
    ids = tc.random_ids(model.cfg, (B, T), seed=2)
    graphdef, state = nnx.split(model)
    logits = self.variant(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(ids))
    reference = _logits(style, ids).logits
    chex.assert_trees_all_close(logits, reference, atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(("v3", "v3"), ("v2_lite", "v2_lite"))
  def test_gradients_finite_and_nonzero(self, style):
    cfg = tc.STYLES[style]()
    (loss, _), grads = _grads(cfg, tc.random_ids(cfg, (B, T), seed=3))
    self.assertTrue(np.isfinite(loss))
    chex.assert_tree_all_finite(grads)
    flat = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    # nnx.grad differentiates nnx.Param only: the aux-loss-free router bias is not a gradient target.
    self.assertFalse([k for k in flat if k.endswith("router/bias")])
    zero = sorted(k for k, g in flat.items() if not np.any(g))
    self.assertEqual(zero, [], "parameters with an all-zero gradient")
    for name in ("embed", "lm_head", "moe_layers/ffn/router/kernel", "moe_layers/ffn/experts/gate",
                 "moe_layers/ffn/experts/up", "moe_layers/ffn/experts/down"):
      self.assertGreater(np.abs(flat[name]).max(), 0, name)
    chex.assert_trees_all_equal_shapes(grads, nnx.state(_model(style), nnx.Param))

  def test_unrolled_layers_match_the_scan(self):
    """Execution(unroll_layers=True) is the same function as the scanned stack: loss, logits and every
    gradient (the v3 style has a dense stack, a routed stack and MTP)."""
    cfg = tc.v3_style()
    ids = tc.random_ids(cfg, (B, T), seed=4)
    _assert_same_function(cfg, ids, models.Execution(unroll_layers=True), 1e-6)
    graphdef, state = nnx.split(tc.build(cfg, seed=0))
    lowered = lambda ex: jax.jit(lambda st, i: nnx.merge(graphdef, st).forward(i, execution=ex).logits).lower(
        state, jnp.asarray(ids)).as_text()
    # Stacks of two or more layers lose their loop (lax.scan keeps a one-trip loop for one layer).
    self.assertLess(lowered(models.Execution(unroll_layers=True)).count("stablehlo.while"),
                    lowered(models.Execution()).count("stablehlo.while"))
    with self.assertRaisesRegex(ValueError, "unroll_layers"):
      models.Execution(unroll_layers="yes")

  @parameterized.named_parameters(("full", "full"), ("dots", "dots"))
  def test_remat_matches_no_remat(self, policy):
    """Rematerialisation lives in the shared layer scan, so one style (sharing the gradient test's
    compile of the "none" policy) covers it."""
    cfg = tc.v2_lite_style()
    ids = tc.random_ids(cfg, (B, T), seed=3)
    logits = _assert_same_function(cfg, ids, models.Execution(remat_policy=policy), 1e-5)
    np.testing.assert_allclose(logits, _logits("v2_lite", ids).logits, atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_packed_documents_match_separate_runs(self, style):
    """Two documents in one row (segment ids 1 and 2, positions restarting at 0) give each document's
    own logits. A document "alone" is run at the start of a row followed by filler tokens, which by
    causality (tested above) cannot affect it; this keeps every call at one compiled shape."""
    cfg = tc.STYLES[style]()
    n1 = 10
    rng = np.random.default_rng(4)
    doc1, doc2 = rng.integers(0, cfg.vocab_size, n1), rng.integers(0, cfg.vocab_size, T - n1)
    filler = rng.integers(0, cfg.vocab_size, T)
    ids = np.stack([np.concatenate([doc1, doc2]), np.concatenate([doc1, filler[n1:]])]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n1), np.arange(T - n1)]), np.arange(T)]).astype(np.int32)
    segments = np.stack([np.repeat([1, 2], [n1, T - n1]), np.ones(T)]).astype(np.int32)
    packed = _logits(style, ids, positions=positions, segment_ids=segments).logits
    alone_ids = np.stack([np.concatenate([doc2, filler[T - n1:]]), filler]).astype(np.int32)
    alone = _logits(style, alone_ids, positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
                    segment_ids=np.ones((B, T), np.int32)).logits
    np.testing.assert_allclose(packed[0, :n1], packed[1, :n1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, n1:], alone[0, :T - n1], atol=1e-5, rtol=1e-5)
    # Without segment ids the second document would attend to the first and differ.
    unsegmented = _logits(style, ids, positions=positions, segment_ids=np.ones((B, T), np.int32)).logits
    self.assertGreater(np.abs(unsegmented[0, n1:] - packed[0, n1:]).max(), 1e-3)

  def test_mtp_logits_shape_and_causality(self):
    model = _model("v3")
    cfg = model.cfg
    ids = tc.random_ids(cfg, (B, T), seed=5)
    base = np.asarray(_logits("v3", ids).mtp_logits)
    chex.assert_shape(base, (B, T - 1, cfg.vocab_size))
    # The public method (traced for its shape only, to save a compile) returns the same array.
    shape = nnx.eval_shape(lambda m: m.mtp_logits(jnp.asarray(ids)), model)
    self.assertEqual((shape.shape, shape.dtype), ((B, T - 1, cfg.vocab_size), jnp.float32))
    for j in (2, 8, T - 1):
      changed = ids.copy()
      changed[:, j] = (changed[:, j] + 7) % cfg.vocab_size
      mtp = np.asarray(_logits("v3", changed).mtp_logits)
      # Row i sees tokens ≤ i+1, so token j may only affect rows i ≥ j-1.
      np.testing.assert_array_equal(mtp[:, :j - 1], base[:, :j - 1], err_msg=f"token {j} leaked")
      self.assertGreater(np.abs(mtp[:, j - 1:] - base[:, j - 1:]).max(), 1e-3)

  def test_mtp_logits_without_mtp_module_raises(self):
    model = tc.build(tc.v3_style(mtp_depth=0))
    self.assertIsNone(model.mtp)
    with self.assertRaisesRegex(ValueError, "MTP"):
      nnx.eval_shape(lambda m: m.mtp_logits(jnp.zeros((1, 4), jnp.int32)), model)

  def test_bf16_compute_close_to_float32(self):
    """bf16 compute with float32 params stays within 10% of the logit spread of float32.

    Routing is a discontinuous function of the hidden state: bf16 rounding flips near-tied top-k
    choices (on CPU for about half of the seeds and router scales tried; on a GPU, whose kernels round
    differently, for this test's former seed), and one flip moves a position by most of a logit std.
    So the smooth parts are compared where routing cannot interfere: the whole decoder with every layer
    dense, and the routed experts under one fixed routing.
    """
    cfg = tc.v3_style(init_std=0.1, first_k_dense=3, mtp_depth=0)  # every layer dense: no routing
    ids = tc.random_ids(cfg, (B, T), seed=6)
    out = _run(tc.build(cfg.replace(dtype=jnp.bfloat16), seed=0), ids)
    ref = _run(tc.build(cfg, seed=0), ids)
    self.assertEqual(out.logits.dtype, jnp.float32)
    self.assertEqual(out.hidden.dtype, jnp.bfloat16)
    chex.assert_tree_all_finite(out.logits)
    diff = np.abs(np.asarray(out.logits) - np.asarray(ref.logits))
    self.assertLess(diff.max(), 0.1 * float(np.std(ref.logits)))
    self.assertGreater(diff.max(), 0, "bf16 run was not actually computed in bf16")

    moe_cfg = tc.v3_style(init_std=0.1)
    moe32 = tc.materialize(lambda: MoE(moe_cfg, rngs=nnx.Rngs(0)), moe_cfg, seed=1)
    moe16 = nnx.merge(nnx.graphdef(MoE(moe_cfg.replace(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))), nnx.state(moe32))
    x_ND = jnp.asarray(np.random.default_rng(7).standard_normal((B * T, moe_cfg.hidden_size)), jnp.float32)
    routing = moe32.router(x_ND[None])
    experts_A, weights_A = routing.experts_BTk.reshape(-1), routing.weights_BTk.reshape(-1)
    y32 = np.asarray(moe32.experts(x_ND, experts_A, weights_A))
    y16 = np.asarray(moe16.experts(x_ND.astype(jnp.bfloat16), experts_A, weights_A), np.float32)
    self.assertLess(np.abs(y16 - y32).max(), 0.05 * float(np.std(y32)))
    self.assertGreater(np.abs(y16 - y32).max(), 0)

  def test_compute_dtype_logits_are_the_float32_ones_rounded(self):
    """Execution(logits_dtype="compute"): the heads return bf16 logits, the float32 ones rounded once,
    MTP head included; the rest of the forward is unchanged."""
    cfg = tc.v3_style(init_std=0.1).replace(dtype=jnp.bfloat16)
    model, ids = tc.build(cfg, seed=0), tc.random_ids(cfg, (B, T), seed=8)
    ref = tc.forward(model, ids, with_mtp=True)
    out = tc.forward(model, ids, with_mtp=True, execution=models.Execution(logits_dtype="compute"))
    for got, want in ((out.logits, ref.logits), (out.mtp_logits, ref.mtp_logits)):
      self.assertEqual(got.dtype, jnp.bfloat16)
      self.assertEqual(want.dtype, jnp.float32)
      # One bf16 rounding (≤ 2^-9 relative; a GPU's GEMM may accumulate in another order).
      np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8, atol=1e-6)
    np.testing.assert_array_equal(out.hidden, ref.hidden)
    with self.assertRaisesRegex(ValueError, "logits_dtype"):
      models.Execution(logits_dtype="bfloat16")

  def test_rejects_unbatched_ids(self):
    with self.assertRaisesRegex(ValueError, "batch, length"):
      _model("v2_lite")(jnp.zeros((5,), jnp.int32))


if __name__ == "__main__":
  absltest.main()
