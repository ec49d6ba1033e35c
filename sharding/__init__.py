"""Mesh construction, the logical-axis → mesh-axis rules table, and expert-parallel dispatch.

Typical use (abstract shapes → shardings → sharded init → jitted step under the mesh):

  mesh = sharding.make_mesh(config.mesh)                     # {data, fsdp, expert, tensor}, one may be -1
  sharding.validate(model_cfg, mesh, batch_size=config.batch_size)
  abstract = nnx.eval_shape(lambda: models.Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state_sh = sharding.state_shardings(abstract_state, mesh, config.get("sharding_rules"))
  with jax.set_mesh(mesh):                                  # needed for expert parallelism
    state = jax.jit(init_state, out_shardings=state_sh)()
    ... jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)), ...)

Without `jax.set_mesh`, jitted code still runs sharded (GSPMD) but the MoE layers do not dispatch
expert-parallel. `sharding.constrain(x, names)` pins an activation to its logical axes on the ambient
mesh. `sharding.expert_parallel` (imported on demand by models/moe.py) holds the all_to_all dispatch.
"""

from sharding.mesh import AXES, make_mesh, mesh_shape, validate
from sharding.rules import (DEFAULT_RULES, batch_sharding, constrain, logical_to_spec, make_rules,
                            named_sharding, state_shardings, tree_shardings_like)

__all__ = [
    "AXES", "DEFAULT_RULES", "batch_sharding", "constrain", "logical_to_spec", "make_mesh", "make_rules",
    "mesh_shape", "named_sharding", "state_shardings", "tree_shardings_like", "validate",
]
