"""benchmarks/train_step.py --meshes on 8 fake CPU devices: the timed step is train.py's sharded step."""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import jax
import numpy as np
from absl.testing import absltest

import sharding
from benchmarks import train_step
from configs import tiny


class MeshTrainStepTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  def test_expert_parallel_step_matches_one_device(self):
    """Same global batch and init on one device and on fsdp=2 × expert=2: the sharded step dispatches
    experts with all_to_all and gives the same losses; rows carry the per-device figures."""
    config = tiny.get_config("test")
    config.model.update(num_layers=2, mtp_depth=0)  # one dense, one MoE layer: compiles in half the time
    batch = train_step.random_batch(config.model.vocab_size, batch=4, seq=32, docs_per_row=2)
    fields = train_step.parse_variant("dropless")
    rows = {}
    for entry in ("data=1", "expert=2+fsdp=2"):
      sizes = train_step.parse_mesh(entry)
      mesh = sharding.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
      rows[entry] = train_step.time_variant(config, fields, batch, warmup=0, steps=2, mesh=mesh)
    one, four = rows["data=1"], rows["expert=2+fsdp=2"]
    self.assertEqual((one["devices"], four["devices"]), (1, 4))
    self.assertEqual((one["expert_parallel"], four["expert_parallel"]), (False, True))
    self.assertEqual(four["mesh"], dict(data=1, fsdp=2, expert=2, tensor=1))
    self.assertEqual(four["global_batch"], 4)
    self.assertAlmostEqual(four["tokens_per_s_per_device"], four["tokens_per_s"] / 4)
    self.assertLess(four["planned_memory_gib"], one["planned_memory_gib"])  # state sharded over 4 devices
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=2e-5)
    self.assertLess(one["losses"][-1], one["losses"][0])  # the step trains


if __name__ == "__main__":
  absltest.main()
