"""The expert-parallel MoE (models/moe_parallel.py: all_to_all dispatch inside shard_map) equals the
single-device MoE, and only the Execution selects it."""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from flax import nnx

import models
import sharding
from models import moe_parallel
from models.moe import MoE

# "capacity": cf = E so nothing is ever dropped; "dropping": cf 0.5 drops many assignments.
EXECUTION = {"dropless": dict(moe_backend="dropless"), "capacity": dict(moe_backend="capacity", capacity_factor=8.0),
             "dropping": dict(moe_backend="capacity", capacity_factor=0.5)}


@functools.cache
def _moe():
  cfg = lib.tiny_config()
  graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
  return cfg, graphdef, lib.randomize(state, seed=3)


@functools.cache
def _reference(backend, b, t):
  cfg, graphdef, state = _moe()
  return jax.jit(_apply_fn(graphdef, models.Execution(**EXECUTION[backend])))(state, *_inputs(cfg, b, t))


def _apply_fn(graphdef, execution):
  def loss(state, x_BTD, valid_BT):
    y_BTD, aux = nnx.merge(graphdef, state)(x_BTD, execution, valid_BT)
    return jnp.sum(jnp.sin(y_BTD)) + aux["balance_loss"], (y_BTD, aux)
  return jax.value_and_grad(loss, has_aux=True)


def _inputs(cfg, b, t):
  x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size), jnp.float32)
  valid = (jnp.arange(t)[None, :] < t - 1).astype(jnp.float32) * jnp.ones((b, 1))
  return x, valid


class ExpertParallelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  def _check(self, backend, mesh_shape, b, t, **execution_fields):
    cfg, graphdef, state = _moe()
    x, valid = _inputs(cfg, b, t)
    (_, (ref_y, ref_aux)), ref_grads = _reference(backend, b, t)

    mesh = sharding.make_mesh(mesh_shape)
    execution = sharding.make_execution(dict(EXECUTION[backend], **execution_fields), mesh)
    self.assertIsNotNone(execution.expert_parallel)
    fn = _apply_fn(graphdef, execution)
    state_s, x_s, valid_s = self._place(mesh, state, x, valid)
    compiled = jax.jit(fn).lower(state_s, x_s, valid_s).compile()  # no jax.set_mesh: the execution names it
    (_, (y, aux)), grads = compiled(state_s, x_s, valid_s)
    self.assertIn("all-to-all", compiled.as_text())  # the expert-parallel path ran
    lib.assert_close_rel(self, y, ref_y, 1e-5, "moe output")
    lib.assert_close_rel(self, aux, ref_aux, 1e-5, "aux")
    lib.assert_close_rel(self, grads, ref_grads, 1e-5, "grad")
    self.assertEqual(float(jnp.sum(aux["expert_load"])), b * t * cfg.num_experts_per_tok)
    return compiled.as_text()

  @parameterized.named_parameters(
      (f"{backend}_{mesh}", backend, mesh) for backend in ("dropless", "capacity") for mesh in lib.MESHES)
  def test_matches_single_device(self, backend, mesh):
    self._check(backend, lib.MESHES[mesh], b=8, t=6)

  @parameterized.named_parameters((mesh, mesh) for mesh in lib.MESHES)
  def test_capacity_drops_the_single_device_assignments(self, mesh):
    # With a small capacity the same assignments must be dropped as on one device (global order).
    self._check("dropping", lib.MESHES[mesh], b=8, t=6)

  @parameterized.named_parameters(("fits", 1.875, False), ("overflows", 0.5, True))
  def test_dispatch_buffers_sized_from_the_routing(self, factor, overflows):
    """dispatch_factor f: send buffers of ceil(f · a / P) rows per shard (here 4 sequences of 6 tokens
    × top-2 = 48 assignments per device, P = 2), and the full-size buffers in a step where some
    device's routing needs more; both give the single-device result. Which case a factor is, is read
    off the routing (this random router sends up to 44 of a device's 48 assignments to one shard)."""
    cfg, graphdef, state = _moe()
    b, t, a = 32, 6, 48
    x, _ = _inputs(cfg, b, t)
    rows = moe_parallel.send_rows(a, 2, factor)
    self.assertEqual(rows, {1.875: 45, 0.5: 12}[factor])
    # 8 batch shards of b / 8 sequences; each expert shard holds 4 of the 8 experts.
    dest_BTk = nnx.merge(graphdef, state).router(x).experts_BTk // (cfg.n_routed_experts // 2)
    per = b // 8
    busiest = max(int(jnp.max(jnp.bincount(dest_BTk[i * per:(i + 1) * per].reshape(-1), length=2)))
                  for i in range(8))
    self.assertEqual(busiest > rows, overflows, busiest)
    hlo = self._check("dropless", lib.MESHES["dp_fsdp_ep"], b=b, t=t, dispatch_factor=factor)
    self.assertIn(f"[2,{rows},{cfg.hidden_size}]", hlo)  # the bounded buffers are compiled in either case

  def test_token_count_not_divisible_by_shards(self):
    # 3 × 5 = 15 tokens over 8 batch shards: padded with assignments that go nowhere.
    self._check("dropless", dict(data=2, fsdp=2, expert=2, tensor=1), b=3, t=5)

  def _place(self, mesh, state, x, valid):
    state_s = jax.device_put(state, sharding.state_shardings(state, mesh))
    x_s = jax.device_put(x, sharding.named_sharding(mesh, ("batch", "length", None), shape=x.shape))
    valid_s = jax.device_put(valid, sharding.batch_sharding(mesh, shape=valid.shape))
    return state_s, x_s, valid_s

  def test_ambient_mesh_does_not_pick_the_algorithm(self):
    """Under `jax.set_mesh` of a mesh whose expert axis splits the experts, an Execution without
    expert_parallel still runs the GSPMD path (no all-to-all) and gives the single-device result."""
    cfg, graphdef, state = _moe()
    x, valid = _inputs(cfg, 8, 6)
    mesh = sharding.make_mesh(lib.MESHES["dp_fsdp_ep"])
    args = self._place(mesh, state, x, valid)
    with jax.set_mesh(mesh):
      compiled = jax.jit(_apply_fn(graphdef, models.Execution())).lower(*args).compile()
      (_, (y, _)), _ = compiled(*args)
    self.assertNotIn("all-to-all", compiled.as_text())
    (_, (ref_y, _)), _ = _reference("dropless", 8, 6)
    lib.assert_close_rel(self, y, ref_y, 1e-5, "moe output")

  def test_make_execution_follows_the_mesh_and_rules(self):
    mesh = sharding.make_mesh(lib.MESHES["dp_ep_tp"])
    ep = sharding.make_execution(None, mesh).expert_parallel
    self.assertEqual((ep.expert_axis, ep.batch_axes, ep.ffn_axis, ep.num_shards),
                     ("expert", ("data", "fsdp", "expert"), "tensor", 2))
    no_ep = sharding.make_mesh(dict(data=4, fsdp=2, expert=1, tensor=1))
    self.assertIsNone(sharding.make_execution({"moe_backend": "capacity"}, no_ep).expert_parallel)
    ep = sharding.make_execution(None, mesh, {"batch": ["data", "expert"], "moe_mlp": None}).expert_parallel
    self.assertEqual((ep.batch_axes, ep.ffn_axis), (("data", "expert"), None))
    with self.assertRaisesRegex(ValueError, "must also split the batch"):
      sharding.make_execution(None, mesh, {"batch": ["data", "fsdp"]})


if __name__ == "__main__":
  absltest.main()
