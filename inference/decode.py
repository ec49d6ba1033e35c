"""Prefill and cached decode steps over a `models.Transformer`, and the jitted generation loop.

Batches of prompts are right-padded: row b's prompt is ids[b, :lengths[b]], its token at position p
sits in cache slot p, and each row decodes at its own position (cache.lengths[b]); cache slots at or
beyond a row's length are masked. So a row gives the same tokens as the prompt alone.

Layers run through the model's own blocks (`run_stack`, as `models.block.run_stack`: a layer scan for
prefill, unrolled for a decode step) with the attention step swapped for a cached one
(inference/attention.py) and MoE layers through `inference.experts.moe_ffn` (one read of each chosen
expert's weights at decode sizes); the layers only read the cache and return the new tokens' entries,
written in one scatter afterwards.

`prefill`, `decode_step` are plain traceable functions of an nnx model; `jit_prefill`,
`jit_decode_step` and `generate` split the model and run one compiled call each. All take an optional
`models.Execution` and run it `for_inference()`: MoE layers route dropless whatever the training
execution said (token dropping would couple the rows of a batch), with no remat; and an execution
nobody resolved (`Execution()`, the default) is resolved for the platform of the model's parameters
(`Execution.resolve`: the Pallas grouped matmul on GPUs, `lax.ragged_dot` elsewhere).
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference import experts, sampling
from inference.attention import cached_attention, prefill_attention
from inference.cache import KINDS, KVCache, init_cache
from models.block import AttentionStep, DecoderBlock
from models.execution import Execution
from models.moe import MoE
from models.mla import attention_mask
from models.rope import rope_tables
from models.transformer import Transformer


def _platform(model: Transformer) -> str:
  """Where the model's parameters live ("cpu", "gpu", "tpu"); for traced parameters (a caller's jit),
  the default backend, where that jit runs unless its inputs say otherwise."""
  leaf = jax.tree.leaves(nnx.state(model))[0]
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    return next(iter(leaf.devices())).platform
  return jax.default_backend()


def _inference(execution: Execution | None, model: Transformer) -> Execution:
  """The execution generation runs: dropless, no remat, resolved for the parameters' platform."""
  execution = (Execution() if execution is None else execution).for_inference()
  return execution.resolve(_platform(model))


def run_stack(stack: DecoderBlock, h_BTD, attention: AttentionStep, execution: Execution, stack_cache=None,
              layer_states=None):
  """`models.block.run_stack` for generation → (hidden [B, T, D], cache entries stacked [L, ...]).

  The same blocks (norms, attention step, residuals, FFN), each MoE layer through `experts.moe_ffn`,
  which indexes the stack's expert weights by layer number; no aux metrics, no remat. Prefill (no
  stack_cache) runs them as a layer scan; a decode step runs them one after another (unrolled: no loop
  bookkeeping between layers, ~4 % of a bench-model step), each layer from its entry of `layer_states`
  when given (`decode_layers`), else from a slice of the stack. `attention(attn, x, stack_cache, layer)`
  gets the whole stacked cache and the layer number (a kernel reads its layer in place)."""
  graphdef, state = nnx.split(stack)
  stacked = experts.stacked_weights(stack)
  num_layers = jax.tree.leaves(state)[0].shape[0]

  def body(h_BTD, xs):
    layer, layer_state, layer_cache = xs
    block = nnx.merge(graphdef, layer_state)
    out_BTD, entries = attention(block.attn, block.attn_norm(h_BTD), layer_cache, layer)
    h_BTD = h_BTD + out_BTD
    x_BTD = block.ffn_norm(h_BTD)
    if isinstance(block.ffn, MoE):
      y_BTD = experts.moe_ffn(block.ffn, x_BTD, execution, stacked, layer)
    else:
      y_BTD = experts.dense_ffn(block.ffn, x_BTD, execution)
    return h_BTD + y_BTD, entries

  if stack_cache is None:
    return jax.lax.scan(body, h_BTD, (jnp.arange(num_layers, dtype=jnp.int32), state, None))
  entries = []
  for i in range(num_layers):
    layer_state = jax.tree.map(lambda a: a[i], state) if layer_states is None else layer_states[i]  # pylint: disable=cell-var-from-loop
    h_BTD, layer_entries = body(h_BTD, (i, layer_state, stack_cache))
    entries.append(layer_entries)
  return h_BTD, jax.tree.map(lambda *e: jnp.stack(e), *entries)


def decode_layers(model: Transformer, batch: int, execution: Execution | None = None):
  """Each layer stack's state split into one state per layer ({"dense": [...], "moe": [...]}), for a
  loop of decode steps to make once before the loop (inside the same jit) and pass to every
  `decode_step(..., layers=...)`. A decode step that slices its layers out of the stacks copies every
  slice that feeds an XLA matmul, every step (~0.1 ms of a bench-model step on an H200): so each
  weight is read once per step, not read, written and read again; the dense MLPs and shared experts
  are widened here too (`experts.pad_mlp_width`: zero units, the same output), so that XLA's GEMMs
  need no pad of their own each step. None (slice in the step) when MoE layers run the module's
  experts (CPU/TPU, large batches): these read the per-layer expert weights, which the split would
  then copy too; inference/experts.py's kernels read the stacked ones. The cost: one copy of the
  other layer weights while the loop runs (0.35 GB for the bench model)."""
  execution = _inference(execution, model)
  if model.moe_layers is not None and not experts.small_batch_kernel(model.moe_layers.ffn, execution, batch):
    return None
  layers = {}
  for name, stack in _stacks(model):
    graphdef, state = nnx.split(stack)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    layers[name] = [_padded_mlps(graphdef, jax.tree.map(lambda a: a[i], state))  # pylint: disable=cell-var-from-loop
                    for i in range(num_layers)]
  return layers


def _padded_mlps(graphdef, layer_state):
  """A layer's state with its dense MLP or shared experts widened by `experts.pad_mlp_width`."""
  block = nnx.merge(graphdef, layer_state)
  mlp = block.ffn.shared if isinstance(block.ffn, MoE) else block.ffn
  if mlp is None:
    return layer_state
  experts.pad_mlp_width(mlp, experts.DECODE_MLP_MULTIPLE)
  return nnx.state(block)


def _stacks(model: Transformer):
  return [(name, getattr(model, f"{name}_layers")) for name in ("dense", "moe")
          if getattr(model, f"{name}_layers") is not None]


def _logits_at(model: Transformer, h_BTD, index_B):
  """Final norm + head at one position per row → float32 [B, V]."""
  h_B1D = jnp.take_along_axis(h_BTD, index_B[:, None, None], axis=1)
  return model.head(model.final_norm(h_B1D))[:, 0]


def prefill(model: Transformer, ids_BT, lengths_B, cache: KVCache, execution: Execution | None = None):
  """Runs the (right-padded) prompts, writes their entries into cache slots [0, T) and sets
  cache.lengths = lengths_B. Returns (float32 logits [B, V] after each row's last prompt token, cache)."""
  b, t = ids_BT.shape
  if t > cache.max_length:
    raise ValueError(f"prompt length {t} exceeds the cache length {cache.max_length}")
  execution = _inference(execution, model)
  kind = cache.kind
  positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos_BTK, sin_BTK = rope_tables(positions_BT, model.cfg)
  # Causal alone keeps real tokens off the padding after them; padded queries are never read.
  mask_B1TT = attention_mask(positions_BT, positions_BT)
  attention = lambda attn, x, *_: prefill_attention(attn, x, cos_BTK, sin_BTK, mask_B1TT, kind,
                                                    execution.attention_impl)
  h_BTD = model.embed_tokens(ids_BT)
  new = {}
  for name, stack in _stacks(model):
    h_BTD, entries = run_stack(stack, h_BTD, attention, execution)
    stack_cache = getattr(cache, name)
    new[name] = {n: jax.lax.dynamic_update_slice_in_dim(stack_cache[n], e.astype(stack_cache[n].dtype), 0, axis=2)
                 for n, e in entries.items()}
  cache = cache._replace(lengths=jnp.asarray(lengths_B, jnp.int32), **new)
  return _logits_at(model, h_BTD, cache.lengths - 1), cache


def decode_step(model: Transformer, tokens_B, cache: KVCache, execution: Execution | None = None,
                layers=None):
  """One new token per row at position cache.lengths[b] → (float32 logits [B, V], updated cache).

  The caller keeps cache.lengths < cache.max_length (a write beyond the cache is dropped). layers: the
  model's `decode_layers`, made once before a loop of steps, or None."""
  b = tokens_B.shape[0]
  execution = _inference(execution, model)
  kind = cache.kind
  positions_B1 = cache.lengths[:, None]
  cos_B1K, sin_B1K = rope_tables(positions_B1, model.cfg)
  kernel = experts.pallas_kernels(execution) and kind == "latent"
  attention = lambda attn, x, stack_cache, layer: cached_attention(
      attn, x, cos_B1K, sin_B1K, stack_cache, layer, cache.lengths, kind, kernel)
  h_B1D = model.embed_tokens(tokens_B[:, None])
  rows_B1 = jnp.arange(b)[:, None]
  new = {}
  for name, stack in _stacks(model):
    stack_cache = getattr(cache, name)
    h_B1D, entries = run_stack(stack, h_B1D, attention, execution, stack_cache=stack_cache,
                               layer_states=None if layers is None else layers[name])
    new[name] = {n: stack_cache[n].at[:, rows_B1, positions_B1].set(e.astype(stack_cache[n].dtype),
                                                                      mode="drop")
                 for n, e in entries.items()}
  cache = cache._replace(lengths=cache.lengths + 1, **new)
  return model.head(model.final_norm(h_B1D))[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "execution"), donate_argnames=("cache",))
def _prefill_jit(graphdef, state, ids_BT, lengths_B, cache, execution):
  return prefill(nnx.merge(graphdef, state), ids_BT, lengths_B, cache, execution)


@functools.partial(jax.jit, static_argnames=("graphdef", "execution"), donate_argnames=("cache",))
def _decode_step_jit(graphdef, state, tokens_B, cache, execution):
  return decode_step(nnx.merge(graphdef, state), tokens_B, cache, execution)


def jit_prefill(model: Transformer, ids_BT, lengths_B, cache: KVCache, execution: Execution | None = None):
  """Compiled `prefill` (the cache argument is donated; MoE layers run dropless)."""
  graphdef, state = nnx.split(model)
  return _prefill_jit(graphdef, state, jnp.asarray(ids_BT, jnp.int32), jnp.asarray(lengths_B, jnp.int32),
                      cache, _inference(execution, model))


def jit_decode_step(model: Transformer, tokens_B, cache: KVCache, execution: Execution | None = None):
  """Compiled `decode_step` (the cache argument is donated; MoE layers run dropless)."""
  graphdef, state = nnx.split(model)
  return _decode_step_jit(graphdef, state, jnp.asarray(tokens_B, jnp.int32), cache,
                          _inference(execution, model))


class Generation(NamedTuple):
  tokens: jax.Array  # int32 [B, T+N]: row b = prompt (lengths[b]), its generated tokens, then pad_id
  num_generated: jax.Array  # int32 [B]: tokens generated per row, a stop token included
  finished: jax.Array  # bool [B]: the row emitted a stop token
  logits: jax.Array | None = None  # float32 [B, N, V] raw logits of each step (output_logits=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cfg", "stop_tokens", "pad_id",
                                             "kind", "output_logits", "execution"))
def _generate_jit(graphdef, state, ids_BT, lengths_B, key, *, max_new_tokens: int,
                  cfg: sampling.SamplingConfig, stop_tokens: tuple[int, ...], pad_id: int, kind: str,
                  output_logits: bool, execution: Execution):
  model = nnx.merge(graphdef, state)
  b, t = ids_BT.shape
  vocab = model.cfg.vocab_size
  cache = init_cache(model.cfg, b, t + max_new_tokens, kind)
  logits_BV, cache = prefill(model, ids_BT, lengths_B, cache, execution)

  valid_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
  out_BS = jnp.full((b, t + max_new_tokens), pad_id, jnp.int32).at[:, :t].set(
      jnp.where(valid_BT, ids_BT, pad_id))
  present_BV = (sampling.token_presence(ids_BT, vocab, valid_BT) if cfg.repetition_penalty != 1.0
                else None)
  stops = jnp.asarray(stop_tokens, jnp.int32)
  rows_B = jnp.arange(b)
  layers = decode_layers(model, b, execution)  # once, outside the loop

  def emit(step, logits_BV, present_BV, finished_B, count_B, out_BS, steps_BNV):
    if steps_BNV is not None:
      steps_BNV = steps_BNV.at[:, step].set(logits_BV)
    token_B = sampling.sample(jax.random.fold_in(key, step), logits_BV, cfg, present_BV)
    token_B = jnp.where(finished_B, pad_id, token_B)
    out_BS = out_BS.at[rows_B, lengths_B + step].set(token_B)
    if present_BV is not None:
      present_BV = present_BV.at[rows_B, token_B].set(True)
    count_B = count_B + (~finished_B).astype(jnp.int32)
    if stop_tokens:
      finished_B = finished_B | jnp.any(token_B[:, None] == stops[None, :], axis=-1)
    return token_B, present_BV, finished_B, count_B, out_BS, steps_BNV

  finished_B = jnp.zeros((b,), bool)
  count_B = jnp.zeros((b,), jnp.int32)
  steps_BNV = jnp.zeros((b, max_new_tokens, vocab), jnp.float32) if output_logits else None
  carry = (jnp.int32(1), cache) + emit(0, logits_BV, present_BV, finished_B, count_B, out_BS, steps_BNV)

  def cond(carry):
    step, _, _, _, finished_B, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(finished_B)

  def body(carry):
    step, cache, token_B, *rest = carry
    logits_BV, cache = decode_step(model, token_B, cache, execution, layers)
    return (step + 1, cache) + emit(step, logits_BV, *rest)

  _, _, _, _, finished_B, count_B, out_BS, steps_BNV = jax.lax.while_loop(cond, body, carry)
  return Generation(out_BS, count_B, finished_B, steps_BNV)


def _on_host(x):
  """x as a numpy array, or None when its values are unknown here: traced under an outer jit, or a
  global array spread over hosts (reading it would need every process)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable:
    return None
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def _integer(name: str, value) -> int:
  try:
    return operator.index(value)  # ints and numpy ints; floats such as 2.7 are refused, not truncated
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _prng_key(seed):
  """An int seed → a new key; a typed jax key (`jax.random.key`) passes through; anything else is an error
  here rather than an invalid-key failure deep inside the compiled loop."""
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    return jax.random.key(seed)
  if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.shape == ():
    return seed
  raise ValueError(f"seed must be an integer or a jax.random.key(...), got {seed!r:.100}")


def _check_prompt_ids(ids_BT: np.ndarray, lengths_B: np.ndarray | None, vocab: int) -> None:
  """Every real prompt token (position < its row's length) must be an id the embedding has: the
  embedding's jnp.take would read a negative id as another token's row and an id >= vocab as NaNs."""
  b, t = ids_BT.shape
  real_BT = np.ones((b, t), bool) if lengths_B is None else np.arange(t)[None, :] < lengths_B[:, None]
  bad_BT = real_BT & ((ids_BT < 0) | (ids_BT >= vocab))
  if bad_BT.any():
    row, pos = np.argwhere(bad_BT)[0]
    raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocab_size); got "
                     f"{ids_BT[row, pos]} at [{row}, {pos}] ({int(bad_BT.sum())} out-of-range prompt tokens)")


def generate_full(model: Transformer, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | jax.Array = 0,
                  stop_tokens=(), pad_id: int = 0, prompt_lengths=None, cache: str = "latent",
                  output_logits: bool = False, execution: Execution | None = None) -> Generation:
  """`generate`, also reporting how many tokens each row generated, which rows stopped and (with
  output_logits) the raw logits of every step (before penalty/temperature; zeros after a loop that
  ended early because every row stopped)."""
  ids_BT = jnp.asarray(input_ids)
  if ids_BT.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids_BT.shape}")
  if not jnp.issubdtype(ids_BT.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integer token ids, got {ids_BT.dtype}")
  b, t = ids_BT.shape
  if b < 1 or t < 1:  # an empty prompt has no last token to predict from
    raise ValueError(f"input_ids must hold at least one prompt of at least one token, got shape {ids_BT.shape}")
  cfg = model.cfg
  vocab = cfg.vocab_size
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
  if t + max_new_tokens > cfg.max_position_embeddings:
    # Like transformers: RoPE is computed from the positions, so decoding goes on; quality may not.
    warnings.warn(f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds max_position_embeddings "
                  f"{cfg.max_position_embeddings}: positions beyond what the model was configured for",
                  stacklevel=2)
  if cache not in KINDS:
    raise ValueError(f"unknown cache {cache!r}; expected one of {KINDS}")
  # Values are checked on the host when they are concrete; traced (under an outer jit) they cannot be.
  host_lengths = None
  if prompt_lengths is None:
    lengths_B = jnp.full((b,), t, jnp.int32)
  else:
    lengths_B = jnp.asarray(prompt_lengths, jnp.int32)
    if lengths_B.shape != (b,):
      raise ValueError(f"prompt_lengths must have shape ({b},), got {lengths_B.shape}")
    host_lengths = _on_host(prompt_lengths)
    if host_lengths is not None and not np.issubdtype(host_lengths.dtype, np.integer):
      raise ValueError(f"prompt_lengths must be integers, got {host_lengths}")
    if host_lengths is not None and not np.all((host_lengths >= 1) & (host_lengths <= t)):
      raise ValueError(f"prompt_lengths must lie in [1, {t}], got {host_lengths}")
  host_ids = _on_host(input_ids)
  if host_ids is not None and (prompt_lengths is None or host_lengths is not None):
    _check_prompt_ids(host_ids, host_lengths, vocab)
  stop_tokens = tuple(_integer("stop_tokens", s)
                      for s in np.asarray(() if stop_tokens is None else stop_tokens, object).reshape(-1))
  for s in stop_tokens:
    if not 0 <= s < vocab:  # a stop token out of range could never be sampled: the row would never stop
      raise ValueError(f"stop_tokens must be token ids in [0, {vocab}) (the model's vocab_size), got {s}")
  pad_id = _integer("pad_id", pad_id)
  if not -2**31 <= pad_id < 2**31:  # negative ids are fine: a marker no token has (tests use -1)
    raise ValueError(f"pad_id must fit int32, got {pad_id}")
  key = _prng_key(seed)
  sampling_cfg = sampling.SamplingConfig(  # checks each setting's range, naming it
      temperature=temperature, top_k=0 if top_k is None else top_k, top_p=1.0 if top_p is None else top_p,
      repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty)
  execution = _inference(execution, model)
  execution.check(cfg, platform=_platform(model))
  graphdef, state = nnx.split(model)
  return _generate_jit(graphdef, state, ids_BT.astype(jnp.int32), lengths_B, key,
                       max_new_tokens=int(max_new_tokens), cfg=sampling_cfg, stop_tokens=stop_tokens,
                       pad_id=pad_id, kind=cache, output_logits=bool(output_logits), execution=execution)


def generate(model: Transformer, input_ids, max_new_tokens: int, **kwargs) -> jax.Array:
  """Autoregressive generation in one compiled call: int [B, T] prompts → int32 [B, T+max_new_tokens].

  Keyword arguments: temperature (0 → greedy), top_k (0: off), top_p (1: off), repetition_penalty
  (1: off), seed (int or a jax.random key), stop_tokens (ids; a row that emits one is finished and
  then emits pad_id), pad_id (default 0), prompt_lengths ([B]; prompts right-padded in input_ids,
  default all T), cache ("latent", the absorbed MLA cache, or "expanded"), execution (a
  `models.Execution`, e.g. a run's expert-parallel one; MoE layers always route dropless; an
  unresolved one, the default, is resolved for the parameters' platform). Row b of the result is its
  prompt, then its generated tokens, then pad_id (so with equal lengths: [prompt | generated]). The
  cache holds T + max_new_tokens positions (past cfg.max_position_embeddings with a warning).
  Settings other than seed are static (a new setting compiles anew); seed and the prompts are not.
  """
  return generate_full(model, input_ids, max_new_tokens=max_new_tokens, **kwargs).tokens
