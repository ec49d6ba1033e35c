"""sharding.make_mesh / mesh_shape / validate: axis inference and the errors raised before compiling."""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import jax
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import AxisType

import sharding


class MakeMeshTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  def test_axes_sizes_and_types(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
    self.assertEqual(mesh.axis_names, ("data", "fsdp", "expert", "tensor"))
    self.assertEqual(dict(mesh.shape), dict(data=2, fsdp=2, expert=2, tensor=1))
    self.assertEqual(mesh.axis_types, (AxisType.Auto,) * 4)
    self.assertEqual(mesh.devices.size, 8)

  def test_minus_one_takes_the_remaining_devices(self):
    cfg = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=2, tensor=2))
    self.assertEqual(dict(sharding.make_mesh(cfg).shape), dict(data=1, fsdp=2, expert=2, tensor=2))
    self.assertEqual(dict(sharding.make_mesh({"data": -1}).shape), dict(data=8, fsdp=1, expert=1, tensor=1))

  def test_explicit_devices_keep_their_order(self):
    devices = jax.devices()[::-1][:4]
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1), devices=devices)
    self.assertEqual(dict(mesh.shape), dict(data=2, fsdp=2, expert=1, tensor=1))
    np.testing.assert_array_equal(mesh.devices, np.array(devices).reshape(2, 2, 1, 1))

  def test_product_must_equal_device_count(self):
    with self.assertRaisesRegex(ValueError, r"has 4 devices .* there are 8 devices"):
      sharding.make_mesh(dict(data=2, fsdp=2, expert=1, tensor=1))
    with self.assertRaisesRegex(ValueError, r"has 16 devices .* there are 8 devices"):
      sharding.make_mesh(dict(data=2, fsdp=2, expert=2, tensor=2))
    with self.assertRaisesRegex(ValueError, r"multiply to 3, .* 8 devices"):
      sharding.make_mesh(dict(data=3, fsdp=-1))

  @parameterized.named_parameters(
      ("zero", dict(data=0, fsdp=8), "'data' must be a positive int or -1"),
      ("negative", dict(data=-2, fsdp=4), "'data' must be a positive int or -1"),
      ("float", dict(data=2.0, fsdp=4), "'data' must be a positive int or -1"),
      ("string", dict(tensor="2", fsdp=4), "'tensor' must be a positive int or -1"),
      ("bool", dict(expert=True, fsdp=8), "'expert' must be a positive int or -1"),
      ("two_inferred", dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
      ("unknown_axis", dict(data=2, fsdp=4, sequence=1), r"unknown mesh axes \['sequence'\]"),
  )
  def test_bad_values(self, mesh_cfg, message):
    with self.assertRaisesRegex(ValueError, message):
      sharding.make_mesh(mesh_cfg)

  def test_not_a_mapping(self):
    with self.assertRaisesRegex(ValueError, "mapping"):
      sharding.make_mesh((2, 2, 2, 1))

  def test_mesh_shape_needs_no_devices(self):
    self.assertEqual(sharding.mesh_shape(dict(fsdp=-1, tensor=8), 256),
                     dict(data=1, fsdp=32, expert=1, tensor=8))


class ValidateTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  def test_accepts_fitting_model(self):
    mesh = sharding.make_mesh(dict(data=2, expert=2, tensor=2))
    self.assertEqual(mesh.axis_names, ("data", "fsdp", "expert", "tensor"))
    self.assertEqual(dict(mesh.shape), dict(data=2, fsdp=1, expert=2, tensor=2))
    # Devices fill the mesh in order, tensor varying fastest: a tensor group is adjacent devices.
    np.testing.assert_array_equal(mesh.devices, np.array(jax.devices()).reshape(2, 1, 2, 2))
    self.assertIsNone(sharding.validate(lib.tiny_config(), mesh, batch_size=8))

  def test_heads_not_divisible_by_tensor(self):
    mesh = sharding.make_mesh(dict(data=2, tensor=4))
    with self.assertRaisesRegex(ValueError, r"num_heads 6 is not divisible by the tensor axis \(4\)"):
      sharding.validate(lib.tiny_config(num_heads=6), mesh)

  def test_experts_not_divisible_by_expert_axis(self):
    mesh = sharding.make_mesh(dict(data=2, expert=4))
    with self.assertRaisesRegex(ValueError, r"n_routed_experts 6 is not divisible by the expert axis \(4\)"):
      sharding.validate(lib.tiny_config(n_routed_experts=6, n_group=1), mesh)

  def test_batch_not_divisible(self):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2))
    with self.assertRaisesRegex(ValueError, r"batch size 12 is not divisible by .*data×fsdp×expert .*= 8"):
      sharding.validate(lib.tiny_config(), mesh, batch_size=12)

  def test_reports_every_problem(self):
    mesh = sharding.make_mesh(dict(expert=4, tensor=2))
    with self.assertRaisesRegex(ValueError, "num_heads 3 .*n_routed_experts 6"):
      sharding.validate(lib.tiny_config(num_heads=3, n_routed_experts=6, n_group=1), mesh)

  def test_foreign_mesh(self):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    with self.assertRaisesRegex(ValueError, "lack"):
      sharding.validate(lib.tiny_config(), mesh)


if __name__ == "__main__":
  absltest.main()
