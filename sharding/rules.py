"""The one table from logical axis names to mesh axes, and the shardings derived from it.

Models name the axes of every parameter (`out_sharding` metadata, e.g. ("layers", "expert", "embed",
"moe_mlp")); this table decides where each lands on the ("data", "fsdp", "expert", "tensor") mesh:

  logical      mesh axes                   why
  batch        ("data", "fsdp", "expert")  every non-tensor axis splits tokens (expert too: EP is
                                           data-parallel outside the MoE dispatch)
  length       None                        no sequence parallelism
  vocab        "tensor"                    embedding rows / head columns split like heads
  embed        "fsdp"                      the ZeRO-3 axis: every weight matrix has a D dim
  heads        "tensor"                    Megatron attention
  q_lora, kv_lora None                     they sit beside embed in wq_a/wkv_a (fsdp is taken there)
  kv           None                        head dims sit beside heads (tensor is taken)
  mlp, moe_mlp "tensor"                    Megatron FFN (dense, shared and routed experts)
  expert       "expert"                    expert parallelism
  layers, norm, mtp_in None                scanned layer axis, norm scales, MTP's [emb; h] input

No parameter combines two names that map to the same mesh axis (JAX rejects a PartitionSpec that uses
an axis twice): every weight has at most one of embed (fsdp), one of heads/vocab/mlp/moe_mlp (tensor)
and one expert. The price: wq_b [q_lora, H, K] and wkv_b [kv_lora, H, K] are split over tensor only
(V3: 3.4B such parameters, replicated over data×fsdp×expert). A config may override entries,
`make_rules({"vocab": None})`; `logical_to_spec` raises on an override that uses an axis twice.
A dimension that is not divisible by its mesh axes keeps only the axes that divide it (replication at
worst, logged at debug level); mesh.validate rejects the cases that must divide (heads, experts).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # Activations.
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    # Parameters.
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "q_lora": None,
    "kv_lora": None,
    "mlp": "tensor",
    "moe_mlp": "tensor",
    "expert": "expert",
    "layers": None,
    "norm": None,
    "mtp_in": None,
}


def make_rules(overrides: Any = None) -> dict[str, MeshAxes]:
  """DEFAULT_RULES updated with `overrides` (a mapping, ConfigDict or (name, axes) pairs).

  Axes may be a mesh axis name, a sequence of names (lists from a config are fine) or None.
  """
  rules = dict(DEFAULT_RULES)
  if overrides is None:
    return rules
  if hasattr(overrides, "to_dict"):
    overrides = overrides.to_dict()
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for name, axes in items:
    rules[name] = _normalise(name, axes)
  return rules


def logical_to_spec(names: Sequence[str | None], rules: Any = None, *, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None, where: str = "") -> P:
  """Logical axis names → PartitionSpec with one entry per dimension.

  With `shape` and `mesh`, a dimension keeps only the mesh axes whose sizes divide it (in table order).
  Raises ValueError for a name missing from the table, a mesh axis not in `mesh`, or a mesh axis used
  by two dimensions.
  """
  rules = make_rules(rules)
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"{where or 'array'}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
  sizes = dict(mesh.shape) if mesh is not None else None
  entries, used = [], {}
  for dim, name in enumerate(names):
    if name is None:
      entries.append(None)
      continue
    if name not in rules:
      raise ValueError(f"{where or 'array'}: no sharding rule for logical axis {name!r}; "
                       f"known: {sorted(rules)}")
    axes = _normalise(name, rules[name])
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if sizes is not None:
      unknown = [a for a in axes if a not in sizes]
      if unknown:
        raise ValueError(f"rule {name!r} → {axes} names axes {unknown} not in mesh {tuple(sizes)}")
    if shape is not None and sizes is not None:
      kept, product = [], 1
      for a in axes:
        if shape[dim] % (product * sizes[a]) == 0:
          kept.append(a)
          product *= sizes[a]
      if len(kept) < len(axes):
        log.debug("%s: dim %d (%s, size %d) not divisible by mesh axes %s; sharded over %s only",
                  where or "array", dim, name, shape[dim], axes, tuple(kept) or "nothing")
      axes = tuple(kept)
    for a in axes:
      if a in used:
        raise ValueError(f"{where or 'array'}: logical axes {used[a]!r} and {name!r} of {tuple(names)} both map "
                         f"to mesh axis {a!r}; change the rules so each mesh axis appears once per array")
      used[a] = name
    entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*entries)


def named_sharding(mesh, names: Sequence[str | None], rules: Any = None, *,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for an array whose dims carry `names` (activations, caches, batches)."""
  return NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh))


def batch_sharding(mesh, rules: Any = None, *, shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for [B, T] token arrays: batch over data×fsdp×expert, length whole."""
  return named_sharding(mesh, ("batch", "length"), rules, shape=shape)


def batch_axes(rules: Any = None) -> tuple[str, ...]:
  """The mesh axes the "batch" rule splits sequences over (default data, fsdp, expert)."""
  axes = make_rules(rules)["batch"]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_shards(mesh, rules: Any = None) -> int:
  """How many ways a global batch is split: the product of the batch axes' sizes. `mesh` is a Mesh,
  an AbstractMesh or a {axis: size} mapping. A batch must be a multiple of this."""
  sizes = dict(mesh) if isinstance(mesh, Mapping) else dict(mesh.shape)
  return math.prod(sizes[a] for a in batch_axes(rules))


def make_execution(execution_cfg: Any, mesh, rules: Any = None) -> "models.Execution":
  """A run's `models.Execution`: the config's `execution` section (mapping or ConfigDict; None = the
  defaults), with expert-parallel dispatch over `mesh` when the rules put experts on a mesh axis of
  size > 1. That axis must also split the batch; the FFN axis is where the rules put `moe_mlp`.
  Platform-dependent defaults (grouped_matmul "auto") are resolved for the mesh's devices."""
  execution = models.execution_from_dict(execution_cfg or {}).resolve(_platform(mesh))
  table = make_rules(rules)
  expert_axis, ffn_axis = table["expert"], table["moe_mlp"]
  sizes = dict(mesh.shape)
  if not isinstance(expert_axis, str) or sizes.get(expert_axis, 1) == 1:
    return execution
  if not (ffn_axis is None or isinstance(ffn_axis, str)):
    raise ValueError(f"expert parallelism needs 'moe_mlp' on at most one mesh axis, got {ffn_axis!r}")
  ep = models.ExpertParallel(mesh=mesh, expert_axis=expert_axis, batch_axes=batch_axes(rules), ffn_axis=ffn_axis)
  return execution.replace(expert_parallel=ep)


def _platform(mesh) -> str | None:
  """The platform of a Mesh's devices ("cpu", "gpu", "tpu"); None for an AbstractMesh (no devices)."""
  return mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else None


def state_shardings(abstract_state: Any, mesh, rules: Any = None) -> Any:
  """NamedShardings matching an (abstract) nnx state, e.g. `nnx.split(nnx.eval_shape(init))[1]`.

  Every `nnx.Variable` (Param, RouterBias, an nnx.Optimizer's OptVariable…) is sharded by its
  `out_sharding` names and keeps its wrapper, so the result can be passed as `jax.jit` in/out
  shardings for that state. Variables without names, plain leaves and scalars are replicated.
  """
  rules = make_rules(rules)

  def one(path, x):
    where = jax.tree_util.keystr(path)
    if isinstance(x, nnx.Variable):
      return x.replace(_leaf_sharding(x.get_value(), x.get_metadata().get("out_sharding"), mesh, rules,
                                      where))
    return _leaf_sharding(x, None, mesh, rules, where)

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_variable)


def tree_shardings_like(params_shardings: Any, tree: Any, mesh=None) -> Any:
  """Shardings for a tree whose parts mirror the parameters (optax states: adam mu/nu, EMA, …).

  A leaf of `tree` (arrays or ShapeDtypeStructs) whose key path ends with the key path of a parameter
  in `params_shardings` and whose rank equals that spec's length (and divides evenly) gets the
  parameter's sharding; every other leaf (step counts, scalars) is replicated. Works for trees built
  from nnx.State or from plain dicts (`state.to_pure_dict()`). nnx Variables in `tree` are kept.
  """
  by_path = {}
  for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    by_path[_plain_path(path)] = sharding
    mesh = mesh if mesh is not None else sharding.mesh
  if mesh is None:
    raise ValueError("tree_shardings_like needs a mesh when params_shardings is empty")
  longest = max((len(p) for p in by_path), default=0)

  def one(path, x):
    key = _plain_path(path)
    shape = getattr(x, "shape", ())
    for start in range(max(0, len(key) - longest), len(key)):
      sharding = by_path.get(key[start:])
      if sharding is not None and len(sharding.spec) == len(shape) and _divides(sharding, shape):
        return sharding
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def _leaf_sharding(value, names, mesh, rules, where) -> NamedSharding:
  shape = getattr(value, "shape", None)
  if shape is None or not names:
    return NamedSharding(mesh, P())
  if len(names) != len(shape):
    log.debug("%s: names %s do not match shape %s; replicated", where, names, shape)
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh, where=where))


def _normalise(name: str, axes: Any) -> MeshAxes:
  if axes is None or isinstance(axes, str):
    return axes
  if isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes):
    return tuple(axes) or None
  raise ValueError(f"rule {name!r}: mesh axes must be a name, a sequence of names or None, got {axes!r}")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _plain_path(path) -> tuple:
  """Key path → tuple of plain keys, without the `.value` step of an nnx.Variable."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name in ("value", "raw_value"):
        continue
      out.append(k.name)
    elif isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(k.key)
    else:
      out.append(str(k))
  return tuple(out)


def _divides(sharding: NamedSharding, shape) -> bool:
  sizes = dict(sharding.mesh.shape)
  for dim, entry in zip(shape, sharding.spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    if dim % math.prod(sizes[a] for a in axes):
      return False
  return True
