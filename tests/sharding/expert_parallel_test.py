"""The expert-parallel MoE (all_to_all dispatch inside shard_map) equals the single-device MoE."""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from flax import nnx

import sharding
from models.moe import MoE


@functools.cache
def _moe(backend):
  # "capacity": cf = E so nothing is ever dropped; "dropping": cf 0.5 drops many assignments.
  if backend == "dropping":
    cfg = lib.tiny_config(moe_backend="capacity", capacity_factor=0.5)
  else:
    cfg = lib.tiny_config(moe_backend=backend, capacity_factor=8.0)
  graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
  return cfg, graphdef, lib.randomize(state, seed=3)


@functools.cache
def _reference(backend, b, t):
  cfg, graphdef, state = _moe(backend)
  return jax.jit(_apply_fn(graphdef))(state, *_inputs(cfg, b, t))


def _apply_fn(graphdef):
  def loss(state, x_BTD, valid_BT):
    y_BTD, aux = nnx.merge(graphdef, state)(x_BTD, valid_BT)
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

  def _check(self, backend, mesh_shape, b, t):
    cfg, graphdef, state = _moe(backend)
    fn = _apply_fn(graphdef)
    x, valid = _inputs(cfg, b, t)
    (_, (ref_y, ref_aux)), ref_grads = _reference(backend, b, t)

    mesh = sharding.make_mesh(mesh_shape)
    shardings = sharding.state_shardings(state, mesh)
    state_s = jax.device_put(state, shardings)
    x_s = jax.device_put(x, sharding.named_sharding(mesh, ("batch", "length", "activation_embed"), shape=x.shape))
    valid_s = jax.device_put(valid, sharding.batch_sharding(mesh, shape=valid.shape))
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(state_s, x_s, valid_s).compile()
      (_, (y, aux)), grads = compiled(state_s, x_s, valid_s)
    self.assertIn("all-to-all", compiled.as_text())  # the expert-parallel path ran
    lib.assert_close_rel(self, y, ref_y, 1e-5, "moe output")
    lib.assert_close_rel(self, aux, ref_aux, 1e-5, "aux")
    lib.assert_close_rel(self, grads, ref_grads, 1e-5, "grad")
    self.assertEqual(float(jnp.sum(aux["expert_load"])), b * t * cfg.num_experts_per_tok)

  @parameterized.named_parameters(
      (f"{backend}_{mesh}", backend, mesh) for backend in ("dropless", "capacity") for mesh in lib.MESHES)
  def test_matches_single_device(self, backend, mesh):
    self._check(backend, lib.MESHES[mesh], b=8, t=6)

  @parameterized.named_parameters((mesh, mesh) for mesh in lib.MESHES)
  def test_capacity_drops_the_single_device_assignments(self, mesh):
    # With a small capacity the same assignments must be dropped as on one device (global order).
    self._check("dropping", lib.MESHES[mesh], b=8, t=6)

  def test_token_count_not_divisible_by_shards(self):
    # 3 × 5 = 15 tokens over 8 batch shards: padded with assignments that go nowhere.
    self._check("dropless", dict(data=2, fsdp=2, expert=2, tensor=1), b=3, t=5)

  def test_no_mesh_means_no_dispatch(self):
    cfg, graphdef, state = _moe("dropless")
    x, valid = _inputs(cfg, 2, 4)
    text = jax.jit(_apply_fn(graphdef)).lower(state, x, valid).as_text()
    self.assertNotIn("all_to_all", text)


if __name__ == "__main__":
  absltest.main()
