"""A decode step's routing after the router's matmul, as one Pallas (Triton) kernel per MoE layer.

From the float32 router logits of a few tokens, `route` computes what `models.router.Router` and
`models.experts.sort_by_expert` compute: scores (sigmoid or softmax), top-k selection on scores + bias,
the combine weights (unbiased scores, optionally normalised, times the route scale), and the dropless
layout (group sizes, and each assignment's sorted row). In XLA these are ~10 small kernels per layer
(scores, top-k, gathers, running counts, the layout), each a few µs at decode sizes: on an H200 the
router, top-k and sort took 76 µs of a 1.34 ms bench-model step in 32 kernels.

One program holds every token: top-k is k rounds of a row max (ties to the lower expert id, as
`lax.top_k`); a token's experts are distinct, so an assignment's row within its expert's group is the
number of earlier tokens that chose that expert, a strictly-lower-triangular [N, N] matrix times the
[N, E] choice matrix (exact: 0/1 products, float32 sums). Group-limited routing (n_group > 1) is not
in the kernel (`supported` says when it applies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.grouped_matmul import block_size

MAX_TOKENS = 128  # one program holds [N, E] scores in registers


def supported(cfg: ModelConfig, num_tokens: int) -> bool:
  return cfg.n_group == 1 and num_tokens <= MAX_TOKENS and cfg.num_experts_per_tok <= cfg.n_routed_experts


def route(logits_NE, bias_E, cfg: ModelConfig, *, num_warps: int = 4, interpret: bool = False):
  """float32 logits [N, E] and selection bias [E] (or None) → (weights float32 [N, k], experts int32
  [N, k], group_sizes int32 [E], position int32 [N·k]): as `Router` and `sort_by_expert` give them for
  assignment a = n·k + j."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plt  # pylint: disable=import-outside-toplevel

  n, e = logits_NE.shape
  k = cfg.num_experts_per_tok
  if not supported(cfg, n) or e != cfg.n_routed_experts:
    raise ValueError(f"route takes ≤ {MAX_TOKENS} tokens of a router without expert groups, got {n} tokens, "
                     f"{e} experts, n_group {cfg.n_group}")
  np_, ep, kp = block_size(n), block_size(e), block_size(k)
  bias_E = jnp.zeros((e,), jnp.float32) if bias_E is None else bias_E.astype(jnp.float32)
  sigmoid, normalise, scale = cfg.score_func == "sigmoid", cfg.norm_topk_prob, cfg.routed_scaling_factor

  def kernel(logits_ref, bias_ref, weights_ref, experts_ref, sizes_ref, position_ref):
    zero = pl.program_id(0)  # a traced 0: static slices past an array are refused
    rows_n, cols_e, cols_k = jnp.arange(np_), jnp.arange(ep), jnp.arange(kp)
    row_ok, col_ok = (rows_n < n)[:, None], (cols_e < e)[None, :]
    logits = plt.load(logits_ref.at[pl.ds(zero, np_), pl.ds(zero, ep)], mask=row_ok & col_ok, other=0.0)
    if sigmoid:
      scores = 1.0 / (1.0 + jnp.exp(-logits))
    else:
      shifted = jnp.where(col_ok, logits, -jnp.inf)
      unnormalised = jnp.exp(shifted - jnp.max(shifted, axis=1, keepdims=True))
      scores = unnormalised / jnp.sum(unnormalised, axis=1, keepdims=True)
    scores = jnp.where(col_ok, scores, 0.0)
    bias = plt.load(bias_ref.at[pl.ds(zero, ep)], mask=cols_e < e, other=0.0)
    choice = jnp.where(col_ok, scores + bias[None, :], -jnp.inf)

    experts, weights = jnp.zeros((np_, kp), jnp.int32), jnp.zeros((np_, kp), jnp.float32)
    chosen = jnp.zeros((np_, ep), jnp.float32)
    picks = []
    for j in range(k):
      best = jnp.max(choice, axis=1, keepdims=True)
      pick = jnp.min(jnp.where(choice == best, cols_e[None, :], ep), axis=1)  # the lowest id on ties
      hit = cols_e[None, :] == pick[:, None]
      weight = jnp.sum(jnp.where(hit, scores, 0.0), axis=1)
      experts = jnp.where(cols_k[None, :] == j, pick[:, None], experts)
      weights = jnp.where(cols_k[None, :] == j, weight[:, None], weights)
      chosen = jnp.where(hit, 1.0, chosen)
      choice = jnp.where(hit, -jnp.inf, choice)
      picks.append(hit)
    if normalise:
      weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + 1e-20)
    weights = weights * scale

    chosen = jnp.where(row_ok, chosen, 0.0)
    sizes = jnp.sum(chosen, axis=0)  # [E], exact integers in float32
    starts = jnp.sum(jnp.where(cols_e[None, :] < cols_e[:, None], sizes[None, :], 0.0), axis=1)  # exclusive
    earlier = jnp.where(rows_n[None, :] < rows_n[:, None], 1.0, 0.0)  # [N, N']: n' before n
    before = jax.lax.dot_general(earlier.astype(jnp.bfloat16), chosen.astype(jnp.bfloat16),
                                 (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    row_of = starts[None, :] + before  # [N, E]: where token n's assignment to expert e goes
    position = jnp.zeros((np_, kp), jnp.int32)
    for j, hit in enumerate(picks):
      at = jnp.sum(jnp.where(hit, row_of, 0.0), axis=1).astype(jnp.int32)
      position = jnp.where(cols_k[None, :] == j, at[:, None], position)

    out_ok = row_ok & (cols_k < k)[None, :]
    plt.store(weights_ref.at[pl.ds(zero, np_), pl.ds(zero, kp)], weights, mask=out_ok)
    plt.store(experts_ref.at[pl.ds(zero, np_), pl.ds(zero, kp)], experts, mask=out_ok)
    plt.store(position_ref.at[pl.ds(zero, np_), pl.ds(zero, kp)], position, mask=out_ok)
    plt.store(sizes_ref.at[pl.ds(zero, ep)], sizes.astype(jnp.int32), mask=cols_e < e)

  weights_Nk, experts_Nk, sizes_E, position_Nk = pl.pallas_call(
      kernel, grid=(1,),
      out_shape=(jax.ShapeDtypeStruct((n, k), jnp.float32), jax.ShapeDtypeStruct((n, k), jnp.int32),
                 jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((n, k), jnp.int32)),
      in_specs=[pl.no_block_spec] * 2, out_specs=[pl.no_block_spec] * 4,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="route",
  )(logits_NE.astype(jnp.float32), bias_E)
  return weights_Nk, experts_Nk, sizes_E, position_Nk.reshape(-1)
