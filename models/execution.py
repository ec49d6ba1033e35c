"""How a model runs, as opposed to what it computes (models/config.py).

`ModelConfig` is the architecture: what a Hugging Face config.json describes, plus the numerics
dtypes. `Execution` holds the choices that do not change the function (up to rounding, and the token
dropping a capacity buffer implies): the MoE matmul backend and its capacity, the grouped-matmul kernel,
the attention kernel, the remat policy, and expert-parallel dispatch over a mesh. It is a frozen value
passed explicitly to `Transformer.forward` and to the train / eval / generate step builders; no layer
reads an ambient mesh or the backend to choose an algorithm. Config files keep it in their `execution`
section; `sharding.make_execution(config.execution, mesh)` adds the expert-parallel part for a mesh and
resolves the platform-dependent defaults (`Execution.resolve`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Literal

import jax
import jax.numpy as jnp

from models.config import ModelConfig

MOE_BACKENDS = ("dropless", "capacity")
ATTENTION_IMPLS = ("xla", "cudnn")
GROUPED_MATMULS = ("auto", "xla", "pallas", "tokamax")
REMAT_POLICIES = ("none", "full", "dots")
LOGITS_DTYPES = ("float32", "compute")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertParallel:
  """Routed experts split over `expert_axis` of `mesh`, tokens moved there and back by all_to_all
  (models/moe_parallel.py). The other fields say how the rest of the step is laid out on the mesh."""

  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
  expert_axis: str = "expert"
  batch_axes: tuple[str, ...] = ("data", "fsdp", "expert")  # mesh axes the batch dim is split over
  ffn_axis: str | None = None  # mesh axis splitting the experts' F dim (tensor parallelism), if any

  def __post_init__(self):
    sizes = dict(self.mesh.shape)
    for axis in (self.expert_axis, *self.batch_axes, *([self.ffn_axis] if self.ffn_axis else [])):
      if axis not in sizes:
        raise ValueError(f"ExpertParallel: axis {axis!r} is not in the mesh {tuple(sizes)}")
    if self.expert_axis not in self.batch_axes:
      raise ValueError(f"ExpertParallel: the expert axis {self.expert_axis!r} must also split the batch "
                       f"(batch axes {self.batch_axes}): each expert shard routes its own tokens")

  @property
  def num_shards(self) -> int:
    return dict(self.mesh.shape)[self.expert_axis]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Execution:
  """Execution choices; the defaults are the exact reference path that runs anywhere."""

  # "dropless": sort by expert + grouped matmul; "capacity": a fixed [E, C, D] buffer, C = ceil(cf·N·k/E)
  # slots per expert, first come first served; assignments beyond it are dropped.
  moe_backend: Literal["dropless", "capacity"] = "dropless"
  capacity_factor: float = 1.25
  # The dropless backend's grouped matmul (models/grouped_matmul.py): "xla" (jax.lax.ragged_dot: the
  # exact reference, CPU/TPU; on GPUs its backward materialises dense [experts, rows, D] operands),
  # "pallas" (Pallas Triton GPU kernels, bf16/fp16), "tokamax" (tokamax's Mosaic GPU kernel; the `gpu`
  # extra) or "auto": `resolve(platform)` picks pallas on GPUs, else xla (an Execution nobody resolved
  # runs xla).
  grouped_matmul: Literal["auto", "xla", "pallas", "tokamax"] = "auto"
  # Training-forward attention: "xla" (einsums, any device, the exact reference) or "cudnn" (fused
  # flash attention, GPU and bf16/fp16 only).
  attention_impl: Literal["xla", "cudnn"] = "xla"
  remat_policy: Literal["none", "full", "dots"] = "none"  # what the backward pass recomputes per layer
  # The LM heads' output: "float32" or "compute" (the model's compute dtype, e.g. bf16; still accumulated
  # in float32 and upcast inside the loss). bf16 halves the traffic over the [B, T, V] logits and their
  # gradient, the largest tensors of a training step, at one bf16 rounding of each logit.
  logits_dtype: Literal["float32", "compute"] = "float32"
  # Decoder stacks as one `lax.scan` (False: compile time independent of depth) or fully unrolled (True:
  # no while loop, so no zero-filled [L, ...] buffers for the stacked residuals and weight gradients and
  # no loop-carry copies; compile time grows with depth). The same function either way.
  unroll_layers: bool = False
  # Train steps: cast the weights that only feed compute-dtype matmuls (≥ 2-D, not the embedding or the
  # float32 router) to the compute dtype once, before the forward, so their gradients stay in that dtype
  # up to the optimizer (half the traffic of the stacked gradient buffers, the clipping norm and the
  # update's reads). Values are unchanged: each such gradient is a compute-dtype product either way.
  cast_weights_once: bool = False
  # Expert parallelism: rows of each device's send buffer per destination shard, as a multiple of the
  # balanced share (ceil(f · assignments / shards)); a step where some device would send more runs
  # with room for every assignment instead (still dropless). 0: always room for every assignment.
  dispatch_factor: float = 0.0
  expert_parallel: ExpertParallel | None = None  # None: experts run where GSPMD puts them

  def __post_init__(self):
    if self.moe_backend not in MOE_BACKENDS:
      raise ValueError(f"unknown moe_backend {self.moe_backend!r}; expected one of {MOE_BACKENDS}")
    factor = self.capacity_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
      raise ValueError(f"capacity_factor must be a number > 0, got {factor!r}")
    factor = self.dispatch_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < float("inf"):
      raise ValueError(f"dispatch_factor must be a number >= 0 (0: room for every assignment), got {factor!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    if self.grouped_matmul not in GROUPED_MATMULS:
      raise ValueError(f"unknown grouped_matmul {self.grouped_matmul!r}; expected one of {GROUPED_MATMULS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    for name in ("unroll_layers", "cast_weights_once"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if self.logits_dtype not in LOGITS_DTYPES:
      raise ValueError(f"unknown logits_dtype {self.logits_dtype!r}; expected one of {LOGITS_DTYPES}")

  def replace(self, **changes) -> "Execution":
    return dataclasses.replace(self, **changes)

  def for_inference(self) -> "Execution":
    """Dropless routing (token dropping would make a row's output depend on the rest of the batch and
    on prompt padding) and no remat (nothing is differentiated)."""
    return self.replace(moe_backend="dropless", remat_policy="none")

  def resolve(self, platform: str | None) -> "Execution":
    """The defaults that depend on the devices made concrete for `platform` ("cpu", "gpu", "tpu"; None:
    unknown, nothing changes): grouped_matmul "auto" → "pallas" on GPUs, else "xla". Layers never look
    at the platform themselves."""
    if self.grouped_matmul != "auto" or platform is None:
      return self
    return self.replace(grouped_matmul="pallas" if platform == "gpu" else "xla")

  def check(self, cfg: ModelConfig, platform: str | None = None) -> None:
    """Raises ValueError when `cfg` cannot run this way (on `platform`, e.g. "cpu"/"gpu", when given)."""
    if self.attention_impl == "cudnn":
      if jnp.dtype(cfg.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs a bfloat16 or float16 compute dtype, not "
                         f"{jnp.dtype(cfg.dtype)}")
      if platform is not None and platform != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a GPU; these devices are {platform!r}")
    if self.grouped_matmul in ("pallas", "tokamax") and platform is not None and platform != "gpu":
      raise ValueError(f"grouped_matmul={self.grouped_matmul!r} needs a GPU; these devices are {platform!r}")
    if self.grouped_matmul == "tokamax" and not _tokamax_installed():
      raise ValueError("grouped_matmul='tokamax' needs tokamax: pip install -e '.[gpu]'")

  def to_dict(self) -> dict[str, Any]:
    """The config-file fields (the expert-parallel part comes from the mesh, not from a file)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "expert_parallel"}


def _tokamax_installed() -> bool:
  return importlib.util.find_spec("tokamax") is not None  # finds it without importing it


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(Execution) if f.name != "expert_parallel")


def execution_from_dict(d: Any) -> Execution:
  """Execution from a config's `execution` section (mapping or ConfigDict); unknown fields are errors."""
  d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
  unknown = sorted(set(d) - set(EXECUTION_FIELDS))
  if unknown:
    raise ValueError(f"unknown execution fields {unknown}; known: {list(EXECUTION_FIELDS)}")
  return Execution(**d)
