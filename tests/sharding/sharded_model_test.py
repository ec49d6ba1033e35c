"""The full model on 8 fake CPU devices: `jit(init, out_shardings=state_shardings(...))` places every
parameter as the rules say, and the sharded forward (logits, MTP logits, MoE expert load, balance loss)
and gradients, expert-parallel as `sharding.make_execution` chooses for the mesh, equal the
single-device ones (1e-5 / 1e-4 relative)."""

import sharding_testlib as lib  # first: sets 8 fake CPU devices before JAX initialises

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import PartitionSpec as P

import models
import sharding

CFG = lib.tiny_config()
BATCH, LENGTH = 8, 8


def init_state():
  # An "rbg" key compiles ~3x faster than threefry on CPU; the values do not depend on the sharding.
  model = models.Transformer(CFG, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")))
  return lib.randomize(nnx.split(model)[1], seed=1)


GRAPHDEF, ABSTRACT_STATE = nnx.split(nnx.eval_shape(lambda: models.Transformer(CFG, rngs=nnx.Rngs(0))))


def loss_fn(state, ids_BT, segments_BT, execution=models.Execution()):
  out = nnx.merge(GRAPHDEF, state).forward(ids_BT, segment_ids=segments_BT, with_mtp=True, execution=execution)
  valid = (segments_BT != 0).astype(jnp.float32)

  def xent(logits, targets, mask):
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)

  loss = (xent(out.logits[:, :-1], ids_BT[:, 1:], valid[:, 1:])
          + 0.3 * xent(out.mtp_logits[:, :-1], ids_BT[:, 2:], valid[:, 2:])
          + 0.01 * (jnp.sum(out.aux["balance_loss"]) + out.mtp_aux["balance_loss"]))
  return loss, dict(logits=out.logits, mtp_logits=out.mtp_logits, expert_load=out.aux["expert_load"],
                    mtp_expert_load=out.mtp_aux["expert_load"], balance_loss=out.aux["balance_loss"])


grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
reference_grad_fn = jax.jit(grad_fn)


class ShardedModelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    lib.require_devices(self)

  @parameterized.named_parameters(*lib.MESHES.items())
  def test_sharded_init_forward_and_grads(self, mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    sharding.validate(CFG, mesh, batch_size=BATCH)
    shardings = sharding.state_shardings(ABSTRACT_STATE, mesh)
    batch = sharding.batch_sharding(mesh)
    execution = sharding.make_execution(None, mesh)
    self.assertIsNotNone(execution.expert_parallel)  # every test mesh splits the experts
    state = jax.jit(init_state, out_shardings=shardings)()

    # Placement: every leaf carries the spec the rules give it.
    for (path, leaf), expected in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                      jax.tree.leaves(shardings)):
      self.assertEqual(leaf.sharding.spec, expected.spec, jax.tree_util.keystr(path))
      self.assertEqual(leaf.sharding.mesh, mesh)
    gate = state["moe_layers"]["ffn"]["experts"]["gate"].get_value()
    self.assertEqual(gate.sharding.spec, P(None, "expert", "fsdp", "tensor"))
    self.assertEqual(gate.addressable_shards[0].data.shape,
                     (CFG.num_moe_layers, CFG.n_routed_experts // mesh_shape["expert"],
                      CFG.hidden_size // mesh_shape["fsdp"], CFG.moe_intermediate_size // mesh_shape["tensor"]))
    self.assertEqual(state["moe_layers"]["ffn"]["router"]["bias"].get_value().sharding.spec, P(None, "expert"))
    self.assertEqual(state["embed"].get_value().sharding.spec, P("tensor", "fsdp"))

    # Numerics: the same state and batch on one device.
    ids, segments = lib.tokens(BATCH, LENGTH, CFG.vocab_size)
    local = jax.device_put(jax.device_get(state), jax.devices()[0])
    (ref_loss, ref_aux), ref_grads = reference_grad_fn(local, ids, segments)
    ids, segments = jax.device_put((ids, segments), batch)
    step = jax.jit(functools.partial(grad_fn, execution=execution), in_shardings=(shardings, batch, batch),
                   out_shardings=((None, None), shardings))
    (loss, aux), grads = step(state, ids, segments)
    self.assertIn("all-to-all", step.lower(state, ids, segments).compile().as_text())
    for name in ("logits", "mtp_logits", "expert_load", "mtp_expert_load", "balance_loss"):
      lib.assert_close_rel(self, aux[name], ref_aux[name], 1e-5, name)
    lib.assert_close_rel(self, loss, ref_loss, 1e-5, "loss")
    lib.assert_close_rel(self, grads, ref_grads, 1e-4, "grad")
    self.assertEqual(float(jnp.sum(aux["expert_load"])),
                     CFG.num_moe_layers * BATCH * LENGTH * CFG.num_experts_per_tok)
    for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(shardings)):
      self.assertEqual(leaf.sharding.spec, expected.spec)


if __name__ == "__main__":
  absltest.main()
