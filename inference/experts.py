"""DeepSeekMoE at generation's small token counts: each chosen expert's weights read once per step.

A decode step routes only B·k assignments (bench model, batch 32: 192 over 64 experts, ~3 rows per
expert), so its routed experts are a pure weight stream: ~2/3 of a step's HBM bytes. The training
path (models/experts.py) is built for 16k-token steps and costs several times that stream here: it
concatenates gate and up into [E, D, 2F] on every call (two thirds of the experts' bytes written and
read again, per layer and step) and its grouped-matmul tiles are 128 rows tall. At these sizes,
`moe_ffn` runs instead:
- the router, the sort by expert and the shared experts as models/moe.py does;
- `grouped_ffn`: a Pallas Triton kernel that reads the gate and up tiles of each expert once,
  accumulates both in float32 and writes silu(x·gate)·(x·up) [A, F]; the same kernel with one weight
  does the down product. Row tiles are 16 tall (one per expert at decode sizes), and the weights are
  indexed in the layer stack [L, E, ...] with the layer number, so no layer's experts are sliced out
  (a slice feeding a kernel is a copy).
On an H200 (bench model, bf16, batch 32; benchmarks/RESULTS.md) the two kernels stream the experts at
~4.4 TB/s: 0.71 ms of a decode step, against 1.8 ms through the training path (1.0 ms of it the gate|up
concatenation). Every expert on every token as batched einsums (no sort, E/k times the arithmetic)
spends about as long in its products, but XLA first copies each layer's expert weights out of the
stack (2.4 ms in all).
Anything else (CPU/TPU, prefill-sized batches, expert parallelism, a tokamax or xla grouped matmul)
runs the module's own path, so those results are unchanged bit for bit. Weights quantized by
`inference.quantize` are read as int8 tiles with their per-column scales. `dense_ffn` can run the dense
MLPs and shared experts through inference/streamed_matmul.py's split-K kernel (opt-in, SMALL_DENSE_KERNEL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from inference import route_kernel, streamed_matmul
from models import grouped_matmul
from models.execution import Execution
from models.experts import RoutedExperts, assignment_rows, combine, invert_positions, permute_rows, sort_by_expert
from models.layers import MLP, precision_for
from models.quantized import Int8Weight
from models.moe import MoE

# Assignments per expert (on average) up to which a step counts as small: decode steps (B·k/E: 3 at
# batch 32 on the bench model) and short prompts; prefill-sized batches take the training kernels.
SMALL_ROWS_PER_EXPERT = 32

# Tiles of `grouped_ffn` at decode sizes: it streams weights, so the row tile is the smallest a
# tensor-core dot takes and the weight tile is [block_k, block_n] per stage (gate and up: two).
TILES = {"gate_up": dict(block_n=64, block_k=128, num_warps=4, num_stages=4),
         "down": dict(block_n=128, block_k=128, num_warps=4, num_stages=4)}
# The same for int8 weights, chosen on an H200 (benchmarks/RESULTS.md, "int8 expert tiles"): 128-column
# tiles (each weight row's load 128 bytes, as bf16's 64) and 2 stages (smaller tiles in shared memory,
# so more programs share an SM) take a batch-32 int8 decode step from 1.37 to 1.22 ms.
INT8_TILES = {"gate_up": dict(block_n=128, block_k=128, num_warps=4, num_stages=2),
              "down": dict(block_n=128, block_k=128, num_warps=4, num_stages=2)}


# A decode step's routing after the router's matmul (scores, top-k, weights, the dropless layout) as
# inference/route_kernel.py's one kernel instead of ~10 XLA ones a layer, for routers without expert
# groups. Off: on an H100 (2026-12-07, benchmarks/RESULTS.md) `route=kernel` gave 1.629 against 1.637
# ms a batch-32 step (within the repeats' spread) and 1.892 against 1.838 at batch 64 × 1024.
ROUTE_KERNEL = False
ROUTE_SETTINGS = {}  # route_kernel.route's settings (tests: interpret=True)


def tiles(name: str, scales) -> dict:
  """`grouped_ffn`'s tile settings for the "gate_up" or "down" product, by weight kind (int8 when the
  weights come with scales)."""
  return (INT8_TILES if scales else TILES)[name]


def pallas_kernels(execution: Execution) -> bool:
  """Whether generation runs its Pallas GPU kernels (this module's, inference/mla_decode.py's): with
  the Pallas grouped matmul, what an execution resolves to on GPUs, and no expert parallelism."""
  return execution.grouped_matmul == "pallas" and execution.expert_parallel is None


def small_batch_kernel(moe: MoE, execution: Execution, num_tokens: int) -> bool:
  """Whether `moe_ffn` runs `num_tokens` through `grouped_ffn` (else through the module)."""
  cfg = moe.cfg
  return (pallas_kernels(execution)
          and execution.moe_backend == "dropless" and type(moe.experts) is RoutedExperts  # pylint: disable=unidiomatic-typecheck
          and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16, jnp.float32)
          and num_tokens * cfg.num_experts_per_tok <= SMALL_ROWS_PER_EXPERT * cfg.n_routed_experts)


# Dense SwiGLU MLPs (the first dense layers, shared experts) at decode sizes through
# inference/streamed_matmul.py's split-K kernel instead of XLA's GEMMs (these ran at ~40 % of the HBM
# bandwidth at M = 32–64 rows on an H200, bf16). Off: slower. Its first version, one column tile per
# program and no split of K, gave 1.385 against 1.340 ms a batch-32 step on an H200 (16–171 programs, too
# few to keep 132 SMs streaming); the split-K version, with `proj=kernel`, 1.678 against 1.637 ms on an
# H100 (1.936 against 1.838 at batch 64 × 1024; benchmarks/RESULTS.md).
SMALL_DENSE_KERNEL = False
SMALL_DENSE_ROWS = 128  # rows (B·T) up to which a dense MLP counts as small: one row tile holds them all
DENSE_TILES = {"gate_up": dict(block_n=64, block_k=128, num_warps=4, num_stages=3),
               "down": dict(block_n=128, block_k=128, num_warps=4, num_stages=3)}


def dense_ffn(mlp: MLP, x_BTD, execution: Execution):
  """A dense SwiGLU MLP for generation: [B, T, D] → [B, T, D], as `mlp(x_BTD)`; through
  `streamed_matmul.split_k_products` when SMALL_DENSE_KERNEL is on, generation's Pallas kernels run, the
  MLP has no biases and B·T ≤ SMALL_DENSE_ROWS."""
  b, t, d = x_BTD.shape
  cfg = mlp.cfg
  if not (SMALL_DENSE_KERNEL and pallas_kernels(execution) and mlp.gate_bias is None and b * t <= SMALL_DENSE_ROWS
          and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16, jnp.float32)):
    return mlp(x_BTD)
  (gate, up, down), scales = _values_and_scales((mlp.gate[...], mlp.up[...], mlp.down[...]))
  x_MD = x_BTD.reshape(b * t, d).astype(cfg.dtype)
  gate_MF, up_MF = streamed_matmul.split_k_products(x_MD, (gate, up), scales and scales[:2], **DENSE_TILES["gate_up"])
  h_MF = (jax.nn.silu(gate_MF) * up_MF).astype(cfg.dtype)  # fuses with the sum over the splits
  (y_MD,) = streamed_matmul.split_k_products(h_MF, (down,), scales and scales[2:], **DENSE_TILES["down"])
  return y_MD.reshape(b, t, d).astype(x_BTD.dtype)


# Hidden width of the dense MLPs and shared experts in a decode loop's per-layer weights
# (`pad_mlp_width`, applied by inference.decode_layers once before the loop): a multiple of this, or
# as stored when 0. XLA's split-K GEMMs pad the contraction of the down product to a multiple of their
# tiles, and with the weight a loop input it pads it on every step: V2-Lite's 10,944-wide dense layer
# took a 28 µs pad (10,944 → 11,008 rows) of a 1.34 ms bench-model step on an H200.
DECODE_MLP_MULTIPLE = 128


def pad_mlp_width(mlp: MLP, multiple: int) -> None:
  """Zero-pads `mlp`'s hidden width F (gate and up columns, down rows, biases) up to a multiple of
  `multiple`, in place; the output is unchanged (a padded unit computes silu(0)·0 = 0, and its down row
  adds that zero). int8 weights pad their values with zeros and their per-column scales with ones."""
  f = mlp.down.shape[0]
  extra = -f % multiple if multiple else 0
  if not extra:
    return
  for name, axis in (("gate", -1), ("up", -1), ("down", -2), ("gate_bias", -1), ("up_bias", -1)):
    variable = getattr(mlp, name)
    if variable is not None:
      variable.set_value(_pad_axis(variable[...], axis, extra))


def _pad_axis(w, axis: int, extra: int):
  """w (array or Int8Weight) with `extra` zeros appended along `axis` (negative); an Int8Weight's scale
  grows by ones there unless the axis is one it is contracted over (size 1)."""
  def pad(a, value=0):
    widths = [(0, 0)] * a.ndim
    widths[a.ndim + axis] = (0, extra)
    return jnp.pad(a, widths, constant_values=value)
  if not isinstance(w, Int8Weight):
    return pad(w)
  scale = w.scale if axis in w.contracted else pad(w.scale, 1)
  return Int8Weight(pad(w.values), scale, w.contracted)


def stacked_weights(stack) -> tuple | None:
  """(gate [L, E, D, F], up [L, E, D, F], down [L, E, F, D]) of a stack of MoE blocks as stored (arrays
  or `Int8Weight`s), else None."""
  ffn = getattr(stack, "ffn", None)
  if not isinstance(ffn, MoE) or type(ffn.experts) is not RoutedExperts:  # pylint: disable=unidiomatic-typecheck
    return None
  return _raw_weights(ffn.experts)


def _raw_weights(experts: RoutedExperts) -> tuple:
  return experts.gate[...], experts.up[...], experts.down[...]


def _values_and_scales(weights) -> tuple[tuple, tuple | None]:
  """Stored weights [..., K, N] → (arrays the kernel reads, their per-column scales [..., N] or None)."""
  if not any(isinstance(w, Int8Weight) for w in weights):
    return tuple(weights), None
  if not all(isinstance(w, Int8Weight) and w.contracted == (-2,) for w in weights):
    raise ValueError("grouped_ffn takes expert weights all int8 (per output column) or none")
  return tuple(w.values for w in weights), tuple(w.scale[..., 0, :] for w in weights)


def moe_ffn(moe: MoE, x_BTD, execution: Execution, stacked=None, layer=None):
  """DeepSeekMoE for generation: [B, T, D] → [B, T, D], as `moe(x_BTD, execution)[0]`.

  stacked, layer: the stack's expert weights (`stacked_weights`) and this layer's index in them, when
  the caller scans a stack; otherwise the module's own weights are used."""
  b, t, d = x_BTD.shape
  if not small_batch_kernel(moe, execution, b * t):
    return moe(x_BTD, execution)[0]
  cfg = moe.cfg
  if stacked is None:
    stacked, layer = tuple(w[None] for w in _raw_weights(moe.experts)), 0
  k = cfg.num_experts_per_tok
  if ROUTE_KERNEL and route_kernel.supported(cfg, b * t):
    bias = None if moe.router.bias is None else moe.router.bias[...]
    weights_Nk, _, group_sizes_E, position_A = route_kernel.route(
        moe.router.logits(x_BTD).reshape(b * t, -1), bias, cfg, **ROUTE_SETTINGS)
    source_S, weights_A = invert_positions(position_A), weights_Nk.reshape(-1)
  else:
    routing = moe.router(x_BTD)
    group_sizes_E, source_S, position_A = sort_by_expert(routing.experts_BTk.reshape(-1), cfg.n_routed_experts)
    weights_A = routing.weights_BTk.reshape(-1)
  x_SD = permute_rows(assignment_rows(x_BTD.reshape(b * t, d), k).astype(cfg.dtype), source_S, position_A)
  layer_1 = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
  # Read in their stored dtype (int8 too), cast to x's tile by tile in the kernel.
  (gate, up, down), scales = _values_and_scales(stacked)
  h_SF = grouped_ffn(x_SD, (gate, up), layer_1, group_sizes_E, scales=scales and scales[:2],
                     **tiles("gate_up", scales))
  y_SD = grouped_ffn(h_SF, (down,), layer_1, group_sizes_E, scales=scales and scales[2:], **tiles("down", scales))
  y_ND = combine(permute_rows(y_SD, position_A, source_S), weights_A, k)
  y_BTD = y_ND.astype(x_BTD.dtype).reshape(b, t, d)
  if moe.shared is not None:
    y_BTD = y_BTD + dense_ffn(moe.shared, x_BTD, execution)
  return y_BTD


def grouped_ffn(x_MK, weights, layer_1, group_sizes_G, *, block_n: int, block_k: int, num_warps: int,
                num_stages: int, block_m: int = 16, scales=None, weights_lhs: bool = False,
                interpret: bool = False):
  """Rows sorted by group (as models/grouped_matmul.py) times their group's weights in layer
  `layer_1[0]` of a stack → [M, N] in x's dtype, float32 accumulation; rows past the groups are not
  written. weights: (w [L, G, K, N],) → x·w, or (gate, up) → silu(x·gate)·(x·up); any float or int8
  dtype (each tile is cast to x's dtype as it is loaded, so neither float32 master weights nor int8
  ones are copied first). scales: None, or one float32 [L, G, N] per weight (int8 per-column
  scales, applied to the float32 products). weights_lhs: each tile product as (w·xᵀ)ᵀ, the weight the
  dot's left operand: on Hopper, wgmma can take its left operand from registers, where a weight tile
  converted from int8 already is; its right operand must come from shared memory (an experiment for
  int8 tiles, which stream at ~2.5 TB/s against ~4.4 for bf16 ones on an H200; on an H100 it made an
  int8 batch-32 step slower, 1.668 against 1.254 ms, so it is not used by default)."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel

  m, k = x_MK.shape
  n = weights[0].shape[-1]
  group_T, first_T, end_T = grouped_matmul.row_tiles(group_sizes_G.astype(jnp.int32), m, block_m)
  block_n = min(block_n, grouped_matmul.block_size(n))
  precision = precision_for(x_MK.dtype)  # float32 at full precision (IEEE dots, not TF32)

  num_weights = len(weights)
  scales = tuple(scales or ())

  def kernel(layer_ref, group_ref, first_ref, end_ref, x_ref, *refs):
    w_refs, s_refs, out_ref = refs[:num_weights], refs[num_weights:-1], refs[-1]
    j, t = pl.program_id(0), pl.program_id(1)
    layer, g, first, end = layer_ref[0], group_ref[t], first_ref[t], end_ref[t]
    rows = (first + jnp.arange(block_m) < end)[:, None]
    cols = j * block_n + jnp.arange(block_n) < n

    @pl.when(first < end)
    def _():
      def step(i, accs):
        ks = i * block_k + jnp.arange(block_k) < k
        a = plt.load(x_ref.at[pl.ds(first, block_m), pl.ds(i * block_k, block_k)], mask=rows & ks[None, :],
                     other=0)
        out = []
        for acc, w_ref in zip(accs, w_refs):
          b = plt.load(w_ref.at[layer, g, pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)],
                       mask=ks[:, None] & cols[None, :], other=0).astype(a.dtype)
          lhs, rhs = (b.T, a.T) if weights_lhs else (a, b)
          out.append(acc + jax.lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), precision=precision,
                                               preferred_element_type=jnp.float32))
        return tuple(out)

      zeros = jnp.zeros((block_n, block_m) if weights_lhs else (block_m, block_n), jnp.float32)
      accs = jax.lax.fori_loop(0, pl.cdiv(k, block_k), step, tuple(zeros for _ in w_refs))
      if weights_lhs:
        accs = tuple(acc.T for acc in accs)
      accs = tuple(acc * plt.load(s_ref.at[layer, g, pl.ds(j * block_n, block_n)], mask=cols, other=0)[None, :]
                   for acc, s_ref in zip(accs, s_refs)) + accs[len(s_refs):]
      if len(accs) == 1:
        out = accs[0]
      else:
        gate, up = accs
        out = gate / (1.0 + jnp.exp(-gate)) * up  # silu(gate) · up
      plt.store(out_ref.at[pl.ds(first, block_m), pl.ds(j * block_n, block_n)], out.astype(out_ref.dtype),
                mask=rows & cols[None, :])

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), x_MK.dtype),
      grid=(pl.cdiv(n, block_n), group_T.shape[0]),
      in_specs=[pl.no_block_spec] * (5 + len(weights) + len(scales)), out_specs=pl.no_block_spec,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="grouped_ffn" if len(weights) == 2 else "grouped_down",
  )(layer_1, group_T, first_T, end_T, x_MK, *weights, *scales)
