"""Generation's execution resolution and its small-batch experts (inference/experts.py).

The Pallas kernels run interpreted here (CPU); the GPU run of benchmarks/decode.py --check compares
the compiled ones with the reference (float32 tokens equal)."""

import contextlib
import dataclasses
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

import inference
import models
from inference import decode as decode_lib
from inference import attention, experts, streamed_matmul
from models import grouped_matmul, quantized
from models.layers import MLP
from tests.inference import tiny_models

B, T, N = 2, 6, 5
PALLAS = models.Execution(grouped_matmul="pallas")  # what "auto" resolves to on a GPU


@contextlib.contextmanager
def _interpreted():
  """Generation's Pallas kernels (inference/experts.py, inference/mla_decode.py) in Pallas's interpreter (CPU)."""
  interpreted = lambda table: {k: dict(v, interpret=True) for k, v in table.items()}
  with mock.patch.dict(experts.TILES, interpreted(experts.TILES)), \
       mock.patch.dict(experts.INT8_TILES, interpreted(experts.INT8_TILES)), \
       mock.patch.dict(experts.DENSE_TILES, interpreted(experts.DENSE_TILES)), \
       mock.patch.dict(streamed_matmul.PROJECTION_TILES, interpret=True), \
       mock.patch.dict(experts.ROUTE_SETTINGS, interpret=True), \
       mock.patch.dict(attention.DECODE_KERNEL, interpret=True):
    yield


def _greedy_loop(model, ids_BT, n, execution, kind="latent"):
  """prefill + n decode steps in one jit, as generate runs them (decode_layers made before the loop)
  → (tokens [B, n], step logits [B, n, V], whether decode_layers split the stacks)."""
  b, t = ids_BT.shape
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids_BT):
    m = nnx.merge(graphdef, state)
    cache = inference.init_cache(m.cfg, b, t + n, kind)
    logits_BV, cache = inference.prefill(m, ids_BT, jnp.full((b,), t), cache, execution)
    layers = inference.decode_layers(m, b, execution)

    def body(i, carry):
      cache, logits_BV, tokens_BN, logits_BNV = carry
      token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
      tokens_BN, logits_BNV = tokens_BN.at[:, i].set(token_B), logits_BNV.at[:, i].set(logits_BV)
      logits_BV, cache = inference.decode_step(m, token_B, cache, execution, layers)
      return cache, logits_BV, tokens_BN, logits_BNV

    init = (cache, logits_BV, jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n, m.cfg.vocab_size)))
    _, _, tokens_BN, logits_BNV = jax.lax.fori_loop(0, n, body, init)
    return tokens_BN, logits_BNV, layers is not None

  tokens, logits, split = run(state, jnp.asarray(ids_BT))
  return np.asarray(tokens), np.asarray(logits), bool(split)


class ResolutionTest(absltest.TestCase):

  def test_generate_resolves_auto_for_the_parameters_platform(self):
    cfg = tiny_models.v2_lite_style()
    model = tiny_models.build(cfg)
    resolved = decode_lib._inference(None, model)  # pylint: disable=protected-access
    on_gpu = jax.default_backend() == "gpu"  # where tiny_models.build put the parameters
    self.assertEqual(resolved.grouped_matmul, "pallas" if on_gpu else "xla")
    self.assertEqual(resolved.moe_backend, "dropless")
    if on_gpu:  # the rest is about CPU parameters
      return
    self.assertEqual(decode_lib._inference(PALLAS, model).grouped_matmul, "pallas")  # pylint: disable=protected-access
    # "auto" on CPU is the reference path: the same tokens and logits as asking for it.
    ids = tiny_models.prompts(cfg, B, T, seed=3)
    auto = inference.generate_full(model, ids, N, output_logits=True)
    xla = inference.generate_full(model, ids, N, output_logits=True,
                                  execution=models.Execution(grouped_matmul="xla"))
    np.testing.assert_array_equal(auto.tokens, xla.tokens)
    np.testing.assert_array_equal(auto.logits, xla.logits)
    with self.assertRaisesRegex(ValueError, "needs a GPU"):
      inference.generate(model, ids, 2, execution=PALLAS)  # checked for the parameters' platform

  def test_decode_layers_only_where_the_kernels_read_the_stacked_experts(self):
    model = tiny_models.build(tiny_models.v3_style())
    if jax.default_backend() != "gpu":
      self.assertIsNone(inference.decode_layers(model, B))  # CPU: the module's experts, per layer
    with mock.patch.object(experts, "DECODE_MLP_MULTIPLE", 0):  # as stored: a layer's slice of the stack
      layers = inference.decode_layers(model, B, PALLAS)
    self.assertEqual([len(layers[k]) for k in ("dense", "moe")], [1, 2])
    chex.assert_trees_all_equal(layers["moe"][1], jax.tree.map(lambda a: a[1], nnx.state(model.moe_layers)))
    padded = inference.decode_layers(model, B, PALLAS)  # the MLP widths padded to DECODE_MLP_MULTIPLE
    widths = (padded["dense"][0]["ffn"]["down"].shape[0], padded["moe"][1]["ffn"]["shared"]["down"].shape[0])
    self.assertEqual([w % experts.DECODE_MLP_MULTIPLE for w in widths], [0, 0])
    self.assertGreater(widths[0], model.cfg.dense_intermediate_size)
    big = experts.SMALL_ROWS_PER_EXPERT * model.cfg.n_routed_experts // model.cfg.num_experts_per_tok + 1
    self.assertIsNone(inference.decode_layers(model, big, PALLAS))  # prefill-sized: the training kernels


class SmallBatchExpertsTest(parameterized.TestCase):

  @parameterized.parameters("float32", "bfloat16")
  def test_moe_ffn_matches_the_module(self, dtype):
    cfg = tiny_models.v3_style(dtype=dtype)
    model = tiny_models.build(cfg)
    stack = model.moe_layers
    layer = jax.tree.map(lambda a: a[1], stack)
    x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, cfg.hidden_size)), dtype)
    reference = layer.ffn(x_BTD, models.Execution())[0]
    self.assertTrue(experts.small_batch_kernel(layer.ffn, PALLAS, 15))
    with _interpreted():
      own = experts.moe_ffn(layer.ffn, x_BTD, PALLAS)  # the layer's own weights
      stacked = experts.moe_ffn(layer.ffn, x_BTD, PALLAS, experts.stacked_weights(stack), 1)
    tol = 1e-5 if dtype == "float32" else 3e-2  # bf16: silu·up is rounded once here, twice there
    scale = float(jnp.abs(reference.astype(jnp.float32)).max())
    for out in (own, stacked):
      self.assertEqual(out.dtype, reference.dtype)
      np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference, np.float32),
                                 atol=tol * scale, rtol=0)

  @parameterized.parameters(False, True)
  def test_dense_ffn_matches_the_mlp(self, int8):
    """Dense MLPs (first layers, shared experts) through the split-K kernel, every row in one row tile:
    float32 weights, or int8 ones with their per-column scales (as `inference.quantize` makes)."""
    cfg = tiny_models.v3_style()
    mlp = MLP(cfg, 40, rngs=nnx.Rngs(2))
    if int8:
      for name in ("gate", "up", "down"):
        getattr(mlp, name).set_value(quantized.quantize_int8(getattr(mlp, name).get_value(), (-2,)))
    x_BTD = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, cfg.hidden_size)), jnp.float32)
    reference = mlp(x_BTD)
    with _interpreted(), mock.patch.object(experts, "SMALL_DENSE_KERNEL", True):
      got = experts.dense_ffn(mlp, x_BTD, PALLAS)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * float(jnp.abs(reference).max()))
    with _interpreted():  # off by default: the module's own path, bit for bit
      chex.assert_trees_all_equal(experts.dense_ffn(mlp, x_BTD, PALLAS), reference)

  def test_module_path_where_the_kernels_do_not_apply(self):
    cfg = tiny_models.v3_style()
    layer = jax.tree.map(lambda a: a[0], tiny_models.build(cfg).moe_layers)
    x_BTD = jnp.ones((2, 3, cfg.hidden_size))
    for execution, tokens in ((models.Execution(grouped_matmul="xla"), 6), (PALLAS, 10_000),
                              (models.Execution(grouped_matmul="tokamax"), 6)):
      self.assertFalse(experts.small_batch_kernel(layer.ffn, execution, tokens))
    chex.assert_trees_all_equal(experts.moe_ffn(layer.ffn, x_BTD, models.Execution()),
                                layer.ffn(x_BTD, models.Execution())[0])

  def test_row_tiles_cover_each_group_once(self):
    """The row tiles both kernels use (models.grouped_matmul.row_tiles): every row of every group in
    exactly one tile of its own group, at most block_m rows a tile, unused tiles empty."""
    sizes = np.asarray([0, 5, 17, 1, 0, 40, 3], np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for block_m in (16, 32):
      group, first, end = (np.asarray(x) for x in grouped_matmul.row_tiles(jnp.asarray(sizes), 70, block_m))
      self.assertEqual(len(group), -(-70 // block_m) + len(sizes) - 1)
      covered = np.zeros(sizes.sum(), int)
      for g, f, e in zip(group, first, end):
        rows = np.arange(f, min(f + block_m, e))
        if rows.size:
          self.assertTrue(np.all((rows >= starts[g]) & (rows < starts[g] + sizes[g])), (g, f, e))
        covered[rows] += 1
      np.testing.assert_array_equal(covered, 1)

  @parameterized.parameters(False, True)
  def test_grouped_ffn_rows_of_each_group_times_its_weights(self, weights_lhs):
    rng = np.random.default_rng(1)
    sizes = np.array([3, 0, 20, 1], np.int32)
    m, k, n, layers = 26, 24, 40, 2  # 2 rows past the groups
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    gate, up = (jnp.asarray(rng.standard_normal((layers, 4, k, n)), jnp.float32) for _ in range(2))
    tiles = dict(block_n=16, block_k=16, num_warps=4, num_stages=2, weights_lhs=weights_lhs, interpret=True)
    out = experts.grouped_ffn(x, (gate, up), jnp.asarray([1], jnp.int32), jnp.asarray(sizes), **tiles)
    lin = experts.grouped_ffn(x, (gate,), jnp.asarray([0], jnp.int32), jnp.asarray(sizes), **tiles)
    group = np.repeat(np.arange(4), sizes)
    for r, g in enumerate(group):
      hi = jax.lax.Precision.HIGHEST
      g1, u1 = jnp.dot(x[r], gate[1, g], precision=hi), jnp.dot(x[r], up[1, g], precision=hi)
      np.testing.assert_allclose(out[r], jax.nn.silu(g1) * u1, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(lin[r], jnp.dot(x[r], gate[0, g], precision=hi), rtol=1e-5, atol=1e-4)


class PadMlpWidthTest(parameterized.TestCase):

  @parameterized.parameters("float", "int8")
  def test_padding_keeps_the_output(self, weights):
    cfg = tiny_models.v3_style(dtype=jnp.float32, param_dtype=jnp.float32)
    mlp = MLP(cfg, 40, rngs=nnx.Rngs(3))
    if weights == "int8":
      for name in ("gate", "up", "down"):
        getattr(mlp, name).set_value(quantized.quantize_int8(getattr(mlp, name)[...], (-2,)))
    x = jax.random.normal(jax.random.key(4), (2, 3, cfg.hidden_size))
    before = mlp(x)
    experts.pad_mlp_width(mlp, 32)
    self.assertEqual((mlp.gate.shape[-1], mlp.up.shape[-1], mlp.down.shape[0]), (64, 64, 64))
    np.testing.assert_allclose(mlp(x), before, rtol=1e-6, atol=1e-6)
    if weights == "int8":
      self.assertEqual((mlp.gate[...].scale.shape, mlp.down[...].scale.shape), ((1, 64), (1, cfg.hidden_size)))


class KernelDecodeTest(absltest.TestCase):

  def test_greedy_decode_with_the_kernels_matches_the_reference(self):
    """float32: prefill and every decode step through the kernels (experts; latent attention reading the
    stacked cache in place; decode_layers split the stacks) give the reference's tokens, and logits within float32 rounding (the kernels do not depend on the
    cache kind; decode_test covers both caches on the reference path)."""
    cfg = tiny_models.v3_style()
    model = tiny_models.build(cfg, seed=5)
    ids = tiny_models.prompts(cfg, B, T, seed=7)
    ref_tokens, ref_logits, ref_split = _greedy_loop(model, ids, N, models.Execution(grouped_matmul="xla"))
    with _interpreted():
      tokens, logits, split = _greedy_loop(model, ids, N, PALLAS)
    self.assertFalse(ref_split)
    self.assertTrue(split)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)

  def test_opt_in_kernels_match_the_reference(self):
    """The same with the opt-in kernels, off by default until measured on a GPU: the dense MLPs, shared
    experts and attention projections through the split-K kernel (SMALL_DENSE_KERNEL,
    STREAMED_PROJECTIONS) and the routing kernel (ROUTE_KERNEL; a router without expert groups)."""
    cfg = dataclasses.replace(tiny_models.v3_style(), n_group=1, topk_group=1)
    model = tiny_models.build(cfg, seed=5)
    ids = tiny_models.prompts(cfg, B, T, seed=7)
    ref_tokens, ref_logits, _ = _greedy_loop(model, ids, N, models.Execution(grouped_matmul="xla"))
    with _interpreted(), mock.patch.object(experts, "SMALL_DENSE_KERNEL", True), \
         mock.patch.object(attention, "STREAMED_PROJECTIONS", True), \
         mock.patch.object(experts, "ROUTE_KERNEL", True), \
         mock.patch.object(experts, "sort_by_expert", side_effect=AssertionError("routed in XLA")), \
         mock.patch.object(streamed_matmul, "matmul", side_effect=AssertionError("a projection fell back")):
      tokens, logits, _ = _greedy_loop(model, ids, N, PALLAS)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


if __name__ == "__main__":
  absltest.main()
