"""benchmarks/train_step.py --meshes on 8 fake CPU devices: the timed step is train.py's sharded step.
(That the sharded step computes what one device does is tests/sharding/sharded_model_test.py's and
expert_parallel_test.py's subject; here one mesh keeps the test cheap: a model init compiles ~15 s on CPU.)"""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import jax
import numpy as np
from absl.testing import absltest

import models
import sharding
from benchmarks import train_step
from configs import tiny
from training import memory


class MeshTrainStepTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  def test_expert_parallel_step_on_a_mesh(self):
    """fsdp=2 × expert=2: the step dispatches experts with all_to_all, trains, and its row carries the
    per-device figures and the plan's memory for that mesh."""
    config = tiny.get_config("test")
    config.model.update(num_layers=2, mtp_depth=0)  # one dense, one MoE layer: compiles in half the time
    batch = train_step.random_batch(config.model.vocab_size, batch=4, seq=32, docs_per_row=2)
    sizes = train_step.parse_mesh("expert=2+fsdp=2")
    mesh = sharding.make_mesh(sizes, jax.devices()[:4])
    row = train_step.time_variant(config, train_step.parse_variant("dropless"), batch, warmup=0, steps=3, mesh=mesh)
    self.assertEqual(row["devices"], 4)
    self.assertTrue(row["expert_parallel"])
    self.assertEqual(row["mesh"], dict(data=1, fsdp=2, expert=2, tensor=1))
    self.assertEqual(row["global_batch"], 4)
    self.assertAlmostEqual(row["tokens_per_s_per_device"], row["tokens_per_s"] / 4)
    self.assertTrue(np.isfinite(row["losses"]).all())
    self.assertLess(row["losses"][-1], row["losses"][0])  # the same batch each step: the loss falls
    planned = config.copy_and_resolve_references()
    planned.update(batch_size=4, seq_len=32, grad_accum_steps=1)
    one_device = memory.plan_memory(planned, models.from_dict(config.model.to_dict()), dict(data=1, fsdp=1, expert=1, tensor=1))
    self.assertLess(row["planned_memory_gib"], one_device.total / 2**30)  # the state is split 4 ways
    self.assertGreater(row["step_memory_gib"], 0)


if __name__ == "__main__":
  absltest.main()
