"""Expert parallelism: routed experts split over the mesh's expert axis, tokens moved by all_to_all.

models/moe.py calls `routed_moe` when its `Execution` carries `expert_parallel` (built from the run's
mesh by `sharding.make_execution`); the mesh is the one named there, never an ambient one. The shared
experts stay outside, in the ordinary GSPMD region; routing, dispatch, the routed experts and combine
run inside one `jax.shard_map` over the whole mesh:

  tokens x [B, T, D] (and masks [B, T])   split over the batch axes (by default data, fsdp, expert)
  router kernel [D, E], bias [E]           replicated (gathered on entry; tiny next to the experts)
  expert weights gate/up [E, D, F],        split over the expert axis (E/P whole experts per shard, so
                 down [E, F, D]            fsdp shards are gathered on entry) and, when F divides, F
                                           over the FFN (tensor) axis (else replicated on it)

each device, holding n = b·T tokens (a = n·k assignments) and the experts of one of P expert shards:
  1. routes its own tokens (models.router.Router, float32);
  2. places its assignments in P fixed-size send buffers [P, r, D], one per expert shard. r = a (each
     buffer can hold all a assignments, so nothing is dropped; dense: XLA:CPU has no
     lax.ragged_all_to_all) unless `Execution.dispatch_factor` f > 0: then r = ceil(f · a / P), and
     when some device of the expert group has more than r assignments for one shard (a pmax over the
     expert axis) that step takes the r = a buffers instead (`lax.cond`), so it stays dropless;
  3. all_to_all over "expert" → the rows every shard of its expert group sends to its experts, with
     local expert ids (empty slots carry the id E/P and come back as zeros);
  4. runs its local experts with models.experts.expert_ffn (dropless, with execution.grouped_matmul;
     empty slots are padding rows that no grouped matmul touches). With the capacity backend the
     assignments beyond ceil(cf · global assignments / E) per expert are dropped first, in global
     token order (counts all_gathered over the batch axes), so exactly the single-device drops happen;
  5. all_to_all back (the same permutation inverted) and reads each assignment from its slot;
  6. combines with the routing weights in float32 and, when F was split, psums the partial
     down-projections over the FFN axis (after the combine, where the array is smallest).
Router statistics are made global with psums over the batch axes: `expert_load` sums local counts,
`balance_loss` (a mean over sequences, each whole on one device) sums local sums and divides by B.

The r = a buffers cost P× the balanced traffic and expert compute; that is the price of being
dropless without ragged collectives, and what dispatch_factor bounds (f× the balanced share, when the
routing fits). A batch not divisible by the batch shards is padded with
sequences that route nowhere and count nowhere.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig
from models.execution import Execution
from models.experts import RoutedExperts, arrival_order, assignment_rows, combine, expert_capacity, expert_ffn
from models.router import Router, count_ids, sequence_balance_loss


def routed_moe(router: Router, experts: RoutedExperts, x_BTD, valid_BT, execution: Execution):
  """Expert-parallel routing + routed experts: x [B, T, D] → ([B, T, D] in x's dtype, aux) with
  aux = {"expert_load": float32 [E] global counts, "balance_loss": scalar}, as MoE computes them.

  valid_BT: optional [B, T] mask of real tokens for the balance loss (None: all tokens).
  execution.expert_parallel names the mesh and its expert / batch / FFN axes.
  """
  cfg = experts.cfg
  ep = execution.expert_parallel
  mesh = ep.mesh
  sizes = dict(mesh.shape)
  num_shards = ep.num_shards
  if cfg.n_routed_experts % num_shards:
    raise ValueError(f"n_routed_experts {cfg.n_routed_experts} is not divisible by the expert axis "
                     f"({num_shards})")
  batch_axes = ep.batch_axes
  ffn = ep.ffn_axis
  tensor = ffn if ffn and sizes[ffn] > 1 and cfg.moe_intermediate_size % sizes[ffn] == 0 else None

  b, t, _ = x_BTD.shape
  real_BT = jnp.ones((b, t), jnp.float32)
  valid_BT = real_BT if valid_BT is None else valid_BT.astype(jnp.float32)
  pad = -b % math.prod(sizes[a] for a in batch_axes)
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, pad), (0, 0), (0, 0)))
    real_BT, valid_BT = (jnp.pad(m, ((0, pad), (0, 0))) for m in (real_BT, valid_BT))

  router_graphdef, router_state = nnx.split(router)
  capacity_factor = execution.capacity_factor if execution.moe_backend == "capacity" else None
  body = functools.partial(_local, cfg=cfg, router_graphdef=router_graphdef, num_shards=num_shards,
                           expert_axis=ep.expert_axis, tensor=tensor, batch_axes=batch_axes,
                           num_sequences=b, capacity_factor=capacity_factor, grouped=execution.grouped_matmul,
                           dispatch_factor=execution.dispatch_factor)
  expert = ep.expert_axis
  y_BTD, load_E, balance = jax.shard_map(
      body, mesh=mesh,
      in_specs=(P(batch_axes, None, None), P(batch_axes, None), P(batch_axes, None), P(),
                P(expert, None, tensor), P(expert, None, tensor), P(expert, tensor, None)),
      out_specs=(P(batch_axes, None, None), P(), P()),
  )(x_BTD, real_BT, valid_BT, router_state, *experts.weights())
  return (y_BTD[:b] if pad else y_BTD), {"expert_load": load_E, "balance_loss": balance}


def _local(x_bTD, real_bT, valid_bT, router_state, gate, up, down, *, cfg: ModelConfig,
           router_graphdef, num_shards: int, expert_axis: str, tensor: str | None,
           batch_axes: tuple[str, ...], num_sequences: int, capacity_factor: float | None, grouped: str,
           dispatch_factor: float = 0.0):
  """One device: route its tokens, dispatch, run its experts on what it receives, combine."""
  b, t, d = x_bTD.shape
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  routing = nnx.merge(router_graphdef, router_state)(x_bTD)
  real_a = jnp.repeat(real_bT.reshape(-1), k)
  load_E = jax.lax.psum(jnp.zeros((e,), jnp.float32).at[routing.experts_BTk.reshape(-1)].add(real_a),
                        batch_axes)
  balance_sum = sequence_balance_loss(routing, e, k, valid_bT) * b  # padded sequences add 0
  balance = jax.lax.psum(balance_sum, batch_axes) / num_sequences

  x_nD = x_bTD.reshape(b * t, d)
  experts_a = jnp.where(real_a > 0, routing.experts_BTk.reshape(-1), e)  # padding goes nowhere
  if capacity_factor is not None:
    # Drop exactly what the single-device backend drops, then run the kept assignments dropless.
    capacity = expert_capacity(capacity_factor, num_sequences * t * k, e)
    experts_a = _global_capacity_drop(experts_a, e, capacity, batch_axes)
  dispatch = functools.partial(_dispatch_and_combine, cfg=cfg, num_shards=num_shards, expert_axis=expert_axis,
                               grouped=grouped)
  operands = (x_nD, experts_a, routing.weights_BTk.reshape(-1), (gate, up, down))
  a = experts_a.shape[0]
  rows = send_rows(a, num_shards, dispatch_factor)
  if rows < a:
    dest_a = experts_a // gate.shape[0]  # num_shards for padding: not counted
    busiest = jax.lax.pmax(jnp.max(count_ids(dest_a, num_shards)), expert_axis)
    y_nD = jax.lax.cond(busiest > rows, functools.partial(dispatch, rows=a), functools.partial(dispatch, rows=rows),
                        *operands)
  else:
    y_nD = dispatch(*operands, rows=a)
  if tensor is not None:
    y_nD = jax.lax.psum(y_nD, tensor)
  return y_nD.astype(x_bTD.dtype).reshape(b, t, d), load_E, balance


def _global_capacity_drop(experts_a, e: int, capacity: int, batch_axes):
  """Capacity dropping in global token order: an assignment keeps its expert iff fewer than C earlier
  assignments of the whole batch (earlier shards first, then earlier local rows) chose that expert —
  the rule of the single-device capacity backend. Dropped (and padding) assignments get the id E,
  which goes nowhere."""
  counts_SE = jax.lax.all_gather(count_ids(experts_a, e), batch_axes)  # id E is not counted
  earlier_S = jnp.arange(counts_SE.shape[0]) < jax.lax.axis_index(batch_axes)
  offset_E = jnp.sum(jnp.where(earlier_S[:, None], counts_SE, 0), axis=0)
  slot_a = arrival_order(experts_a, e, offset_E)
  return jnp.where((experts_a < e) & (slot_a < capacity), experts_a, e)


def send_rows(num_assignments: int, num_shards: int, dispatch_factor: float) -> int:
  """Rows of each per-destination send buffer: ceil(f · a / P), at most a; a when f is 0."""
  if not dispatch_factor:
    return num_assignments
  return min(num_assignments, max(1, math.ceil(dispatch_factor * num_assignments / num_shards)))


def _dispatch_and_combine(x_nD, experts_a, weights_a, expert_weights, *, cfg: ModelConfig,
                          num_shards: int, expert_axis: str, grouped: str, rows: int):
  """all_to_all the a = n·k assignments to the shards owning their experts and back → float32 [n, D].
  rows: the send buffer's rows per destination shard; the caller makes sure no device has more
  assignments than that for one shard."""
  n, d = x_nD.shape
  local_experts = expert_weights[0].shape[0]
  a = experts_a.shape[0]
  k = a // n
  dest_a = experts_a // local_experts  # owning expert shard; num_shards (nobody) for padding
  slot_a = arrival_order(dest_a, num_shards)
  flat_a = dest_a * rows + slot_a  # row of the [P·rows] send buffer; past its end for padding

  send_PrD = (jnp.zeros((num_shards * rows, d), x_nD.dtype)
              .at[flat_a].set(assignment_rows(x_nD, k), mode="drop").reshape(num_shards, rows, d))
  send_ids_Pr = (jnp.full((num_shards * rows,), local_experts, jnp.int32)
                 .at[flat_a].set(experts_a - dest_a * local_experts, mode="drop")
                 .reshape(num_shards, rows))
  recv_PrD = jax.lax.all_to_all(send_PrD, expert_axis, 0, 0)
  recv_ids_Pr = jax.lax.all_to_all(send_ids_Pr, expert_axis, 0, 0)

  y_RD = expert_ffn(cfg, expert_weights, recv_PrD.reshape(-1, d), recv_ids_Pr.reshape(-1), grouped=grouped)
  back_RD = jax.lax.all_to_all(y_RD.reshape(num_shards, rows, d), expert_axis, 0, 0).reshape(-1, d)
  y_aD = back_RD.at[flat_a].get(mode="fill", fill_value=0)
  return combine(y_aD, weights_a, k)
