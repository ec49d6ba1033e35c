"""Float32 means float32 on every backend: every dot of a float32 model asks for full precision, and a
bf16 model's dots keep the backend default (the router, float32 whatever the model, always full).

On a Hopper GPU a default-precision float32 dot runs as TF32 (~1e-3 relative error: the float32 HF
parity test missed its 1e-4 tolerance by 50x); on a CPU it is exact whatever it asks for, so these
tests read the StableHLO lowered for "cuda" (lowering needs no GPU), and for "cpu" where it differs
(ragged_dot: a chlo.ragged_dot for the GPU, a masked dot_general on the CPU).
"""

import functools
import re

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
import sharding
from inference import decode
from inference.cache import init_cache
from models.layers import precision_for
from models.mla import fused_attention
from tests.models import tiny_configs as tc

B, T = 2, 8
_DOT_OPS = ("stablehlo.dot_general", "chlo.ragged_dot")
_OP_NAME = re.compile(r"^\s*%[\w#:, %]* = \"?([\w.]+)")
_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]|#chlo<precision (\w+)>, #chlo<precision (\w+)>")
_OPERANDS = re.compile(r": \(tensor<([^>]*)>, tensor<([^>]*)>")
_LOC_DEF = re.compile(r"^#(loc\d*) = (.*)$", re.M)
_LOC_REF = re.compile(r"#(loc\d*)")


def _lower(fn, *args, platform: str) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text(debug_info=True)


def _dots(hlo: str) -> list[tuple[str, str, bool]]:
  """(precision, operand element type, whether models/router.py made it) of every dot in StableHLO
  text lowered with debug_info; a dot without a precision attribute counts as DEFAULT. Backward
  products carry the location of their forward op, so they count for the router too."""
  locations = dict(_LOC_DEF.findall(hlo))

  @functools.cache
  def from_router(ref):  # a location is a tree of names, file positions and call sites
    text = locations.get(ref, "")
    return "models/router.py" in text or any(from_router(r) for r in _LOC_REF.findall(text))

  dots = []
  for line in hlo.splitlines():
    op = _OP_NAME.match(line)
    if not op or "dot" not in op.group(1):
      continue
    assert op.group(1) in _DOT_OPS, line  # a product lowered some other way would go unchecked
    precision, operands = _PRECISION.search(line), _OPERANDS.search(line)
    assert operands, line
    lhs_p, rhs_p = [p for p in precision.groups() if p] if precision else ("DEFAULT", "DEFAULT")
    lhs_e, rhs_e = (t.split("x")[-1] for t in operands.groups())
    assert lhs_p == rhs_p and lhs_e == rhs_e, line  # one rule per dot, not per operand
    dots.append((lhs_p, lhs_e, from_router(_LOC_REF.findall(line)[-1])))
  return dots


def _abstract(cfg):
  return nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))


def _train_step_hlo(cfg, execution, platform: str) -> str:
  """StableHLO of the loss and its gradient (forward, MTP, balance loss, every backward product)."""
  graphdef, state = _abstract(cfg)

  def loss(state, ids_BT):
    out = nnx.merge(graphdef, state).forward(ids_BT, with_mtp=True, execution=execution)
    logp_BTV = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    xent = -jnp.mean(jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], axis=-1))
    return xent + jnp.mean(out.mtp_logits) + 0.01 * jnp.sum(out.aux["balance_loss"])

  return _lower(jax.value_and_grad(loss), state, jax.ShapeDtypeStruct((B, T), jnp.int32), platform=platform)


def _decode_hlo(cfg, kind: str, platform: str) -> tuple[str, str]:
  """StableHLO of a prefill and of one cached decode step against a `kind` cache."""
  graphdef, state = _abstract(cfg)
  cache = jax.eval_shape(functools.partial(init_cache, cfg, B, 2 * T, kind))
  ids, lengths = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)
  prefill = lambda s, i, l, c: decode.prefill(nnx.merge(graphdef, s), i, l, c)
  step = lambda s, t, c: decode.decode_step(nnx.merge(graphdef, s), t, c)
  return (_lower(prefill, state, ids, lengths, cache, platform=platform),
          _lower(step, state, lengths, cache, platform=platform))


def _assert_rule(test, dots, model_dtype):
  """A float32 model: every dot HIGHEST. A bf16 model: the router's float32 dots HIGHEST, every other
  dot DEFAULT, bf16 or float32 (the float32 backward products of the attention scores and of
  ragged_dot stay as fast as they were)."""
  test.assertNotEmpty(dots)
  test.assertIn(("HIGHEST", "f32", True), dots)  # the router's dots are seen
  if model_dtype == "float32":
    test.assertEqual({(p, e) for p, e, _ in dots}, {("HIGHEST", "f32")})
    return
  for precision, element, router in dots:
    test.assertEqual(precision, "HIGHEST" if router else "DEFAULT", f"a {element} dot, router={router}")
    if router:
      test.assertEqual(element, "f32")
  test.assertIn(("DEFAULT", "bf16", False), dots)


class PrecisionForTest(parameterized.TestCase):

  def test_full_precision_for_float32_and_float64_only(self):
    for dtype in (jnp.float32, jnp.float64, np.dtype("float32"), "float32"):
      self.assertEqual(precision_for(dtype), jax.lax.Precision.HIGHEST)
    for dtype in (jnp.bfloat16, jnp.float16, "bfloat16"):
      self.assertIsNone(precision_for(dtype))


class LoweredDotsTest(parameterized.TestCase):

  @parameterized.product(dtype=("float32", "bfloat16"), moe_backend=("dropless", "capacity"))
  def test_train_step(self, dtype, moe_backend):
    hlo = _train_step_hlo(tc.v3_style(dtype=dtype), models.Execution(moe_backend=moe_backend), "cuda")
    _assert_rule(self, _dots(hlo), dtype)

  @parameterized.parameters("float32", "bfloat16")
  def test_train_step_on_cpu(self, dtype):
    hlo = _train_step_hlo(tc.v3_style(dtype=dtype), models.Execution(), "cpu")
    _assert_rule(self, _dots(hlo), dtype)

  @parameterized.parameters("float32", "bfloat16")
  def test_train_step_expert_parallel(self, dtype):
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
    execution = models.Execution(expert_parallel=models.ExpertParallel(mesh=mesh))
    hlo = _train_step_hlo(tc.v3_style(dtype=dtype), execution, "cuda")
    _assert_rule(self, _dots(hlo), dtype)

  @parameterized.product(dtype=("float32", "bfloat16"), kind=("latent", "expanded"))
  def test_prefill_and_decode(self, dtype, kind):
    for hlo in _decode_hlo(tc.v3_style(dtype=dtype), kind, "cuda"):  # each with its own location table
      _assert_rule(self, _dots(hlo), dtype)

  @parameterized.parameters("float32", "bfloat16")
  def test_fused_attention_xla(self, dtype):
    q, k = jax.ShapeDtypeStruct((B, T, 2, 8), dtype), jax.ShapeDtypeStruct((B, T, 8), dtype)
    mask = jax.ShapeDtypeStruct((B, 1, T, T), jnp.bool_)
    attention = functools.partial(fused_attention, scale=0.3, implementation="xla")
    dots = _dots(_lower(attention, q, q, q, k, q, mask, platform="cuda"))
    self.assertLen(dots, 4)  # scores and values, in each branch of the plain-causal cond
    want = ("HIGHEST", "f32", False) if dtype == "float32" else ("DEFAULT", "bf16", False)
    self.assertEqual(set(dots), {want})


if __name__ == "__main__":
  absltest.main()
