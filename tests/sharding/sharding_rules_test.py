"""The rules table: logical names → PartitionSpecs for every parameter of every shipped config, no mesh
axis twice, divisibility fallback, overrides, and shardings for nnx / optax states."""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import importlib

import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import PartitionSpec as P

import models
import sharding
from models.router import RouterBias

CONFIGS = ("deepseek_v3", "deepseek_v2", "deepseek_v2_lite", "tiny", "bench_v2lite_4l")
MESHES = (dict(data=2, fsdp=2, expert=2), dict(data=2, expert=2, tensor=2), dict(fsdp=2, expert=2, tensor=2),
          dict(fsdp=8), dict(expert=8), dict(tensor=4, fsdp=2))


def _abstract_state(cfg):
  return nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))[1]


def _config(name):
  if name == "test_tiny":
    return lib.tiny_config()
  return models.from_dict(importlib.import_module(f"configs.{name}").get_config().model.to_dict())


def _axes(entry):
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


class LogicalToSpecTest(absltest.TestCase):

  def test_default_table(self):
    self.assertEqual(sharding.logical_to_spec(("layers", "expert", "embed", "moe_mlp")),
                     P(None, "expert", "fsdp", "tensor"))
    self.assertEqual(sharding.logical_to_spec(("vocab", "embed")), P("tensor", "fsdp"))
    self.assertEqual(sharding.logical_to_spec(("batch", "length")), P(("data", "fsdp", "expert"), None))
    self.assertEqual(sharding.logical_to_spec(("kv_lora", None)), P(None, None))

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, "no sharding rule for logical axis 'sequence'"):
      sharding.logical_to_spec(("batch", "sequence"))

  def test_duplicate_mesh_axis_rejected(self):
    with self.assertRaisesRegex(ValueError, "'embed' and 'q_lora' .* both map to mesh axis 'fsdp'"):
      sharding.logical_to_spec(("embed", "q_lora"), {"q_lora": "fsdp"})
    with self.assertRaisesRegex(ValueError, "both map to mesh axis 'fsdp'"):
      sharding.logical_to_spec(("batch", "length", "embed"))  # activations name their model dim None

  def test_overrides(self):
    rules = sharding.make_rules({"batch": ["data", "fsdp"], "length": "expert", "vocab": None})
    self.assertEqual(sharding.logical_to_spec(("batch", "length"), rules), P(("data", "fsdp"), "expert"))
    self.assertEqual(sharding.logical_to_spec(("vocab", "embed"), rules), P(None, "fsdp"))
    self.assertEqual(sharding.make_rules([("embed", None)])["embed"], None)
    self.assertEqual(sharding.make_rules()["embed"], "fsdp")
    with self.assertRaisesRegex(ValueError, "rule 'embed'"):
      sharding.make_rules({"embed": 3})

  def test_batch_shards_follow_the_rules(self):
    sizes = dict(data=2, fsdp=3, expert=5, tensor=7)
    self.assertEqual(sharding.batch_axes(), ("data", "fsdp", "expert"))
    self.assertEqual(sharding.batch_shards(sizes), 30)
    self.assertEqual(sharding.batch_shards(sizes, {"batch": ["data", "expert"]}), 10)
    self.assertEqual(sharding.batch_shards(sizes, {"batch": "tensor"}), 7)
    self.assertEqual(sharding.batch_shards(sizes, {"batch": None}), 1)

  def test_indivisible_dims_fall_back(self):
    lib.require_devices(self)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2))
    # 4 rows over data×fsdp×expert = 8: keep data and fsdp only.
    self.assertEqual(sharding.logical_to_spec(("batch", "length"), shape=(4, 16), mesh=mesh),
                     P(("data", "fsdp"), None))
    self.assertEqual(sharding.logical_to_spec(("batch", "length"), shape=(1, 16), mesh=mesh), P(None, None))
    # fsdp (2) does not divide 9; tensor (size 1) divides anything and stays.
    self.assertEqual(sharding.logical_to_spec(("vocab", "embed"), shape=(7, 9), mesh=mesh), P("tensor", None))
    self.assertEqual(sharding.batch_sharding(mesh, shape=(2, 3)).spec, P("data", None))
    with self.assertRaisesRegex(ValueError, "not in mesh"):
      sharding.logical_to_spec(("embed",), {"embed": "model"}, shape=(8,), mesh=mesh)


class ConfigParamsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  @parameterized.parameters(*CONFIGS, "test_tiny")
  def test_every_parameter_gets_a_valid_spec(self, name):
    cfg = _config(name)
    state = _abstract_state(cfg)
    checked = 0
    for mesh_shape in MESHES:
      mesh = sharding.make_mesh(mesh_shape)
      try:
        sharding.validate(cfg, mesh)
      except ValueError:
        continue  # e.g. the 4-head tiny config on tensor=8: validate is what rejects it
      shardings = sharding.state_shardings(state, mesh)
      for (path, var), sh in zip(nnx.to_flat_state(state), jax.tree.leaves(shardings)):
        where = f"{name} {mesh_shape} {'/'.join(map(str, path))}"
        names = var.get_metadata()["out_sharding"]
        shape = var.get_value().shape
        self.assertLen(sh.spec, len(shape), where)
        used = [a for entry in sh.spec for a in _axes(entry)]
        self.assertEqual(len(used), len(set(used)), f"{where}: {sh.spec}")
        sh.shard_shape(shape)  # raises if a dimension is not divisible
        # With the shipped configs on these meshes nothing needs the divisibility fallback.
        self.assertEqual(sh.spec, sharding.logical_to_spec(names), where)
        checked += 1
    self.assertGreater(checked, 0)

  def test_router_bias_and_names(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2))
    state = _abstract_state(_config("deepseek_v3"))
    shardings = sharding.state_shardings(state, mesh)
    bias = shardings["moe_layers"]["ffn"]["router"]["bias"]
    self.assertIsInstance(bias, RouterBias)
    self.assertEqual(bias.get_value().spec, P(None, "expert"))
    self.assertEqual(shardings["moe_layers"]["ffn"]["experts"]["down"].get_value().spec,
                     P(None, "expert", "tensor", "fsdp"))
    self.assertEqual(shardings["mtp"]["eh_proj"].get_value().spec, P(None, "fsdp"))

  def test_unnamed_variables_are_replicated(self):
    class Holder(nnx.Module):
      def __init__(self):
        self.bias = RouterBias(jnp.zeros((8,)))
        self.named = RouterBias(jnp.zeros((8,)), out_sharding=("expert",), eager_sharding=False)
        self.kernel = nnx.Param(jnp.zeros((4, 8)))

    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2))
    shardings = sharding.state_shardings(nnx.state(nnx.eval_shape(Holder)), mesh)
    self.assertEqual(shardings["bias"].get_value().spec, P())
    self.assertEqual(shardings["named"].get_value().spec, P("expert"))
    self.assertEqual(shardings["kernel"].get_value().spec, P())


class OptimizerStateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)
    self.cfg = lib.tiny_config()
    self.mesh = sharding.make_mesh(dict(data=2, expert=2, tensor=2))

  def test_optax_state_of_pure_dict_params(self):
    params = nnx.state(nnx.eval_shape(lambda: models.Transformer(self.cfg, rngs=nnx.Rngs(0))), nnx.Param)
    param_sh = sharding.state_shardings(params, self.mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = jax.eval_shape(tx.init, nnx.to_pure_dict(params))
    opt_sh = sharding.tree_shardings_like(param_sh, opt_state)
    adam = opt_sh[1][0]
    self.assertEqual(adam.count.spec, P())
    for moment in (adam.mu, adam.nu):
      self.assertEqual(moment["moe_layers"]["ffn"]["experts"]["gate"].spec, P(None, "expert", "fsdp", "tensor"))
      self.assertEqual(moment["embed"].spec, P("tensor", "fsdp"))
    # Every moment leaf has its parameter's sharding.
    flat_params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(param_sh)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adam.mu)[0]:
      key = tuple(k.key for k in path)
      self.assertEqual(leaf, flat_params[key], key)

    # Sharded optimizer init straight onto the mesh.
    with jax.set_mesh(self.mesh):
      abstract = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(params))
      opt = jax.jit(tx.init, out_shardings=opt_sh)(abstract)
    self.assertEqual(opt[1][0].mu["lm_head"].sharding.spec, P("fsdp", "tensor"))

  def test_optax_state_of_nnx_state_params(self):
    params = nnx.state(nnx.eval_shape(lambda: models.Transformer(self.cfg, rngs=nnx.Rngs(0))), nnx.Param)
    param_sh = sharding.state_shardings(params, self.mesh)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    by_path = sharding.tree_shardings_like(param_sh, opt_state)
    by_names = sharding.state_shardings(opt_state, self.mesh)  # the Variables keep their names
    self.assertEqual(jax.tree.leaves(by_path), jax.tree.leaves(by_names))
    self.assertEqual(by_path[0].mu["moe_layers"]["ffn"]["router"]["kernel"].get_value().spec,
                     P(None, "fsdp", "expert"))

  def test_nnx_optimizer_state(self):
    def make():
      model = models.Transformer(self.cfg, rngs=nnx.Rngs(0))
      return nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    shardings = sharding.state_shardings(nnx.state(nnx.eval_shape(make)), self.mesh)
    self.assertEqual(shardings["step"].get_value().spec, P())
    self.assertEqual(shardings["opt_state"][0]["count"].get_value().spec, P())
    self.assertEqual(shardings["opt_state"][0]["nu"]["moe_layers"]["ffn"]["experts"]["up"].get_value().spec,
                     P(None, "expert", "fsdp", "tensor"))


if __name__ == "__main__":
  absltest.main()
