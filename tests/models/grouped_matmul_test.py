"""The dropless experts around their grouped matmul (CPU, exact), and tokamax's kernel against the
`lax.ragged_dot` reference (GPU only)."""

import functools
import unittest
from unittest import mock

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from models import experts as experts_lib
from models.execution import Execution
from models.grouped_matmul import grouped_matmul, grouped_product, weight_gradient
from models.layers import precision_for
from tests.models import tiny_configs as tc

E, D, F, K = 8, 32, 24, 3  # experts, model dim, expert width, experts per token


def _reference_dropless(cfg, weights, x_AD, experts_A):
  """The dropless backend as it was before the grouped-matmul kernels: gate and up as two
  `lax.ragged_dot`s, a plain gather to sort and a scatter to unsort, padding rows masked at the end."""
  gate, up, down = weights
  e = gate.shape[0]
  order_A = jnp.argsort(experts_A, stable=True)
  group_sizes_E = jnp.bincount(experts_A, length=e).astype(jnp.int32)
  ragged = lambda x, w: jax.lax.ragged_dot(x.astype(cfg.dtype), w.astype(cfg.dtype), group_sizes_E,
                                          precision=precision_for(cfg.dtype),
                                          preferred_element_type=jnp.float32).astype(cfg.dtype)
  x_sorted_AD = x_AD[order_A]
  y_sorted_AD = ragged(jax.nn.silu(ragged(x_sorted_AD, gate)) * ragged(x_sorted_AD, up), down)
  y_AD = jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)
  return jnp.where((experts_A < e)[:, None], y_AD, 0)


def _problem(seed, a=120, padding=0, e=E, d=D, f=F):
  """Random rows, expert ids (imbalanced, one expert empty; `padding` rows get the id e = nowhere) and
  weights of std 1/sqrt(fan in)."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(e, 0.7))
  p[1] = 0.0
  ids = rng.choice(e, size=a, p=p / p.sum())
  ids[rng.choice(a, size=padding, replace=False)] = e
  weights = (rng.standard_normal((e, d, f)) / np.sqrt(d), rng.standard_normal((e, d, f)) / np.sqrt(d),
             rng.standard_normal((e, f, d)) / np.sqrt(f))
  x = rng.standard_normal((a, d))
  g = rng.standard_normal((a, d))  # the cotangent of the output
  return (jnp.asarray(x, jnp.float32), jnp.asarray(ids, jnp.int32),
          tuple(jnp.asarray(w, jnp.float32) for w in weights), jnp.asarray(g, jnp.float32))


def _value_and_grads(ffn, x, ids, weights, g):
  """ffn(x, weights) and the gradients of <ffn(x, weights), g> w.r.t. x and the three weights."""
  loss = lambda x, w: jnp.sum(ffn(x, w).astype(jnp.float32) * g)
  return ffn(x, weights), jax.grad(loss, argnums=(0, 1))(x, weights)


@jax.custom_vjp
def _garbage_past_groups(x, w, group_sizes):
  """lax.ragged_dot that, like a GPU kernel, leaves rows past the groups unwritten (here: NaN), in its
  output and in the gradient of x. The weight gradient reads whatever those rows of x and of the
  incoming gradient hold, so anything the experts fail to keep clean shows up as NaN."""
  y = jax.lax.ragged_dot(x, w, group_sizes, precision="highest", preferred_element_type=jnp.float32)
  return _nan_past(y, group_sizes)


def _nan_past(y, group_sizes):
  return jnp.where((jnp.arange(y.shape[0]) < jnp.sum(group_sizes))[:, None], y, jnp.nan)


def _garbage_fwd(x, w, group_sizes):
  return _garbage_past_groups(x, w, group_sizes), (x, w, group_sizes)


def _garbage_bwd(residuals, g):
  x, w, group_sizes = residuals
  # Σ over each group's rows of xᵀ·g, with the rows weighted 1 (in the group) or 0 (not): as in the
  # GPU kernel, a NaN in any row, in or past the groups, makes the result NaN.
  ends = jnp.cumsum(group_sizes)
  rows = jnp.arange(x.shape[0])[:, None]
  member_AG = ((rows >= ends - group_sizes) & (rows < ends)).astype(jnp.float32)
  dw = jnp.einsum("ag,ak,an->gkn", member_AG, x, g, precision="highest")
  dx = jax.lax.ragged_dot(g, jnp.swapaxes(w, 1, 2), group_sizes, precision="highest",
                          preferred_element_type=jnp.float32)
  return _nan_past(dx, group_sizes), dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_garbage_past_groups.defvjp(_garbage_fwd, _garbage_bwd)


class AroundTheKernelTest(parameterized.TestCase):
  """Sort, group sizes, the fused gate/up split, un-sort and padding, run with the reference grouped
  matmul plugged in: the dropless backend as it was, in float32 — the forward pass bit for bit, the
  gradients to float32 rounding (with gate and up fused, the input's gradient dg·gateᵀ + du·upᵀ is one
  contraction over 2F instead of two summed ones, and XLA blocks the weight-gradient dots differently)."""

  def setUp(self):
    super().setUp()
    self.cfg = tc.v3_style(dtype=jnp.float32)

  @parameterized.named_parameters(("no_padding", 0), ("padding", 17))
  def test_matches_the_previous_dropless_path(self, padding):
    x, ids, weights, g = _problem(seed=padding, padding=padding)
    ours = _value_and_grads(lambda x, w: experts_lib.expert_ffn(self.cfg, w, x, ids, grouped="xla"),
                            x, ids, weights, g)
    reference = _value_and_grads(lambda x, w: _reference_dropless(self.cfg, w, x, ids), x, ids, weights, g)
    np.testing.assert_array_equal(ours[0], reference[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours[1], reference[1])
    np.testing.assert_array_equal(ours[0][ids == E], 0.0)  # padding rows get nothing...
    np.testing.assert_array_equal(ours[1][0][ids == E], 0.0)  # ...and send no gradient back

  def test_sort_by_expert(self):
    _, ids, _, _ = _problem(seed=3, padding=9)
    layouts = {}
    for name, largest in (("argsort", 0), ("counting", len(ids))):  # both algorithms of sort_by_expert
      with mock.patch.object(experts_lib, "COUNTING_SORT_MAX", largest):
        layouts[name] = [np.asarray(a) for a in jax.jit(experts_lib.sort_by_expert, static_argnums=1)(ids, E)]
    for ours, theirs in zip(layouts["counting"], layouts["argsort"]):
      np.testing.assert_array_equal(ours, theirs)
    self._check_layout(np.asarray(ids), *layouts["counting"])

  def test_count_ids(self):
    ids = jax.random.randint(jax.random.key(5), (7, 9), -2, E + 3)  # some out of range on both sides
    np.testing.assert_array_equal(experts_lib.count_ids(ids, E),
                                  np.bincount(np.asarray(ids).ravel() + 2, minlength=E + 5)[2:E + 2])

  def _check_layout(self, ids, sizes, source, position):
    np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=E + 1)[:E])
    valid = int(sizes.sum())
    np.testing.assert_array_equal(ids[source[:valid]], np.repeat(np.arange(E), sizes))  # grouped by expert
    self.assertTrue(np.all(np.diff(source[:valid])[np.diff(ids[source[:valid]]) == 0] > 0))  # stable
    np.testing.assert_array_equal(source[valid:], len(ids))  # rows past the groups read nothing
    np.testing.assert_array_equal(position[source[:valid]], np.arange(valid))  # inverse permutations
    np.testing.assert_array_equal(position[ids == E], len(ids))

  def test_rows_past_the_groups_are_never_read(self):
    """A kernel that leaves rows past the groups unwritten (tokamax on GPU) changes nothing."""
    x, ids, weights, g = _problem(seed=5, padding=23)
    ffn = lambda x, w: experts_lib.expert_ffn(self.cfg, w, x, ids, grouped="xla")
    reference = _value_and_grads(ffn, x, ids, weights, g)
    garbage = lambda x, w, sizes, impl, dtype: _garbage_past_groups(x, w, sizes).astype(dtype)
    with unittest.mock.patch.object(experts_lib, "grouped_matmul", garbage):
      ours = _value_and_grads(ffn, x, ids, weights, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, reference)

  @parameterized.named_parameters(("rows_to_spare", 170), ("all_rows", 200))
  def test_gpu_kernels_indexing(self, used):
    """The Pallas GPU kernels, interpreted: partial row, column and contraction tiles, empty groups,
    rows past the groups holding NaN (never read)."""
    rng = np.random.default_rng(9)
    sizes = np.asarray([30, 0, 77, 12, 1, used - 120])
    ends = np.cumsum(sizes)
    x = rng.standard_normal((200, 48))
    w = rng.standard_normal((6, 48, 40))
    dy = rng.standard_normal((200, 40))
    x[used:], dy[used:] = np.nan, np.nan
    tiles = dict(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=3, interpret=True)
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    per_group = lambda f: np.concatenate([f(g, slice(e - s, e)) for g, (s, e) in enumerate(zip(sizes, ends))])
    y = grouped_product(as32(x), as32(w), jnp.asarray(sizes, jnp.int32), **tiles)
    np.testing.assert_allclose(y[:used], per_group(lambda g, r: x[r] @ w[g]), rtol=1e-5, atol=1e-5)
    dx = grouped_product(as32(dy), as32(w), jnp.asarray(sizes, jnp.int32), transpose_w=True, **tiles)
    np.testing.assert_allclose(dx[:used], per_group(lambda g, r: dy[r] @ w[g].T), rtol=1e-5, atol=1e-5)
    dw = weight_gradient(as32(x), as32(dy), jnp.asarray(sizes, jnp.int32), jnp.float32, **tiles)
    np.testing.assert_allclose(dw, np.stack([x[e - s:e].T @ dy[e - s:e] for s, e in zip(sizes, ends)]),
                               rtol=1e-5, atol=1e-5)

  def test_execution_resolves_the_kernel_for_the_platform(self):
    auto = Execution()
    self.assertEqual(auto.grouped_matmul, "auto")
    self.assertEqual(auto.resolve("gpu").grouped_matmul, "pallas")
    self.assertEqual(auto.resolve("cpu").grouped_matmul, "xla")
    self.assertEqual(auto.resolve("tpu").grouped_matmul, "xla")
    self.assertIs(auto.resolve(None), auto)
    self.assertEqual(Execution(grouped_matmul="xla").resolve("gpu").grouped_matmul, "xla")  # explicit stays
    bf16 = tc.v3_style(dtype=jnp.bfloat16)
    Execution(grouped_matmul="pallas").check(bf16, platform="gpu")
    with self.assertRaisesRegex(ValueError, "grouped_matmul='pallas' needs a GPU; these devices are 'cpu'"):
      Execution(grouped_matmul="pallas").check(bf16, platform="cpu")
    with self.assertRaisesRegex(ValueError, "unknown grouped_matmul 'cutlass'"):
      Execution(grouped_matmul="cutlass")

  def test_unresolved_auto_runs_the_reference(self):
    x, ids, weights, _ = _problem(seed=6)
    auto = experts_lib.expert_ffn(self.cfg, weights, x, ids, grouped=Execution().grouped_matmul)
    np.testing.assert_array_equal(auto, experts_lib.expert_ffn(self.cfg, weights, x, ids, grouped="xla"))
    with self.assertRaisesRegex(ValueError, "unknown grouped matmul 'cutlass'"):
      grouped_matmul(x, weights[0], jnp.zeros((E,), jnp.int32), "cutlass", jnp.float32)


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def _tokamax_usable() -> bool:
  try:
    import tokamax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


GPU_IMPLS = [dict(testcase_name=impl, impl=impl) for impl in ("pallas", "tokamax")]


class GpuKernelTest(parameterized.TestCase):
  """The GPU paths against lax.ragged_dot, all in bf16: forward and the four gradients."""

  def setUp(self):
    super().setUp()
    # Asked here, not in a class decorator: at import time it would start a JAX backend while pytest
    # collects, before tests/sharding sets its 8 fake devices (every sharding test then skipped).
    if jax.default_backend() != "gpu":
      self.skipTest("the GPU grouped matmuls run on GPUs")
    self.cfg = tc.v3_style(dtype=jnp.bfloat16)

  def _skip_unless_usable(self, impl):
    if impl == "tokamax" and not _tokamax_usable():
      self.skipTest("tokamax is not installed (the gpu extra)")

  @parameterized.product(impl=("pallas", "tokamax"), padding=(0, 300))
  def test_expert_ffn_matches_the_reference(self, impl, padding):
    self._skip_unless_usable(impl)
    # Shapes the kernel tiles fully and partly: 2000 rows over 16 experts (one empty), D 256, F 384.
    x, ids, weights, g = _problem(seed=7 + padding, a=2000, padding=padding, e=16, d=256, f=384)
    results = {}
    for name in (impl, "xla"):
      ffn = jax.jit(lambda x, w, name=name: experts_lib.expert_ffn(self.cfg, w, x, ids, grouped=name))
      y, (dx, (dgate, dup, ddown)) = _value_and_grads(ffn, x, ids, weights, g)
      results[name] = dict(y=y, dx=dx, dgate=dgate, dup=dup, ddown=ddown)
    for name, reference in results["xla"].items():
      ours = results[impl][name]
      self.assertTrue(np.all(np.isfinite(np.asarray(ours, np.float32))), name)
      self.assertLess(_relative_error(ours, reference), 1e-2, name)
    np.testing.assert_array_equal(np.asarray(results[impl]["y"], np.float32)[np.asarray(ids) == 16], 0.0)

  @parameterized.named_parameters(*GPU_IMPLS)
  def test_grouped_matmul_matches_the_reference(self, impl):
    self._skip_unless_usable(impl)
    rng = np.random.default_rng(8)
    sizes = jnp.asarray([300, 0, 77, 512, 1, 150, 0, 460], jnp.int32)  # 1500 of 1600 rows
    x = jnp.asarray(rng.standard_normal((1600, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 256, 512)) / 16, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((1600, 512)), jnp.bfloat16)
    valid = np.arange(1600) < 1500
    outs = {}
    for name in (impl, "xla"):
      f = jax.jit(lambda x, w, name=name: grouped_matmul(x, w, sizes, name, jnp.bfloat16))
      y, vjp = jax.vjp(f, x, w)
      dx, dw = vjp(g)
      outs[name] = [np.asarray(a, np.float32) for a in (y[valid], dx[valid], dw)]
    for name, ours, reference in zip(("y", "dx", "dw"), outs[impl], outs["xla"]):
      self.assertLess(_relative_error(ours, reference), 1e-2, name)


if __name__ == "__main__":
  absltest.main()
