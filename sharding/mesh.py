"""The device mesh: four named axes, built from a config, checked against the model before compiling.

Axes, outermost first (slowest-varying over the device list, so `tensor` lands on the closest devices):
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  expert  expert parallelism: routed experts split over it, tokens dispatched with all_to_all;
          outside the MoE layers it is one more data-parallel axis
  tensor  tensor (Megatron) parallelism over heads / FFN width / vocab

Axis types are `AxisType.Auto` (not jax.make_mesh's default Explicit): parameters and batches get
NamedShardings from sharding/rules.py, `jax.jit` in/out shardings pin the boundaries and GSPMD
propagates everything in between, as in MaxText. Explicit mode would make every einsum whose operands
disagree on a sharding an error unless the model annotated its outputs, and the models only name
logical axes. The expert-parallel MoE (models/moe_parallel.py, chosen by the run's `models.Execution`)
is a `jax.shard_map` island inside that Auto region.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from sharding.rules import batch_axes, batch_shards

AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """Resolves a {data, fsdp, expert, tensor} mapping (one entry may be -1) to sizes whose product is
  `num_devices`. Missing axes default to 1. Raises ValueError on anything else."""
  sizes = _as_dict(mesh_cfg)
  unknown = sorted(set(sizes) - set(AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {AXES}")
  shape = {}
  for name in AXES:
    value = sizes.get(name, 1)
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"mesh axis {name!r} must be a positive int or -1 (the remaining devices), "
                       f"got {value!r}")
    shape[name] = value
  inferred = [name for name, value in shape.items() if value == -1]
  if len(inferred) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {inferred}")
  known = math.prod(v for v in shape.values() if v != -1)
  if inferred:
    if num_devices % known:
      raise ValueError(f"cannot infer mesh axis {inferred[0]!r}: the other axes multiply to {known}, "
                       f"which does not divide the {num_devices} devices")
    shape[inferred[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"mesh {shape} has {known} devices (the product of its axes) but there are "
                     f"{num_devices} devices; make the product {num_devices} or set one axis to -1")
  return shape


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "expert", "tensor") mesh with Auto axis types over `devices` (default: all).

  mesh_cfg: a mapping or ml_collections ConfigDict with those four ints, one of which may be -1.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def validate(model_cfg, mesh: Mesh | jax.sharding.AbstractMesh, *, batch_size: int | None = None,
             rules: Any = None) -> None:
  """Raises ValueError when the model (a models.ModelConfig) cannot run on `mesh` as the rules shard it.

  Dimensions that merely do not divide fall back to replication (see rules.py); these cases cannot:
  attention heads over `tensor`, routed experts over `expert` (expert parallelism gives each shard
  whole experts), and, when given, the global batch over the batch axes (`rules.batch_shards`).
  """
  missing = [a for a in AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} lack {missing}; build it with sharding.make_mesh")
  sizes = dict(mesh.shape)
  problems = []
  if model_cfg.num_heads % sizes["tensor"]:
    problems.append(f"num_heads {model_cfg.num_heads} is not divisible by the tensor axis "
                    f"({sizes['tensor']})")
  has_moe = model_cfg.num_moe_layers > 0 or model_cfg.mtp_depth > 0
  if has_moe and model_cfg.n_routed_experts % sizes["expert"]:
    problems.append(f"n_routed_experts {model_cfg.n_routed_experts} is not divisible by the expert axis "
                    f"({sizes['expert']})")
  shards = batch_shards(mesh, rules)
  if batch_size is not None and batch_size % shards:
    axes = "×".join(batch_axes(rules))
    problems.append(f"global batch size {batch_size} is not divisible by the batch shards {axes} = {shards}")
  if problems:
    raise ValueError(f"model does not fit mesh {sizes}: " + "; ".join(problems))


def _as_dict(mesh_cfg: Any) -> dict[str, Any]:
  if hasattr(mesh_cfg, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
    return dict(mesh_cfg.to_dict())
  if isinstance(mesh_cfg, Mapping):
    return dict(mesh_cfg)
  raise ValueError(f"mesh config must be a mapping of axis sizes, got {type(mesh_cfg).__name__}")
