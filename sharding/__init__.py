"""Mesh construction, the logical-axis → mesh-axis rules table, and the run's execution on a mesh.

Typical use (abstract shapes → shardings → sharded init → jitted step):

  mesh = sharding.make_mesh(config.mesh)                     # {data, fsdp, expert, tensor}, one may be -1
  rules = config.get("sharding_rules")
  sharding.validate(model_cfg, mesh, batch_size=config.batch_size, rules=rules)
  execution = sharding.make_execution(config.execution, mesh, rules)   # expert-parallel when expert > 1
  abstract = nnx.eval_shape(lambda: models.Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state_sh = sharding.state_shardings(abstract_state, mesh, rules)
  state = jax.jit(init_state, out_shardings=state_sh)()
  ... jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh, rules)), ...)

The expert-parallel dispatch itself is model code (models/moe_parallel.py); what selects it is the
`models.Execution` that `make_execution` returns, which names its mesh explicitly. `batch_shards`
is the one count of how many ways a batch splits.
"""

from sharding.mesh import AXES, make_mesh, mesh_shape, validate
from sharding.rules import (DEFAULT_RULES, batch_axes, batch_sharding, batch_shards, logical_to_spec,
                            make_execution, make_rules, named_sharding, state_shardings, tree_shardings_like)

__all__ = [
    "AXES", "DEFAULT_RULES", "batch_axes", "batch_sharding", "batch_shards", "logical_to_spec", "make_execution",
    "make_mesh", "make_rules", "mesh_shape", "named_sharding", "state_shardings", "tree_shardings_like",
    "validate",
]
