"""Next-token selection: repetition penalty, temperature, top-k, top-p (nucleus), seeded sampling.

Order as in transformers: repetition penalty → temperature → top-k → top-p → sample. Temperature 0
means greedy (argmax of the penalised logits). All functions work on float32 logits [B, V] and are
jit-friendly; the settings live in a frozen, hashable `SamplingConfig` (a static jit argument).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off; else keep the k most likely tokens
  top_p: float = 1.0  # 1: off; else keep the smallest top set with probability mass ≥ top_p
  repetition_penalty: float = 1.0  # 1: off; transformers' RepetitionPenaltyLogitsProcessor semantics

  def __post_init__(self):
    temperature, top_k, top_p, penalty = (_finite(n, getattr(self, n)) for n in
                                          ("temperature", "top_k", "top_p", "repetition_penalty"))
    if not temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not top_k.is_integer() or top_k < 0:
      raise ValueError(f"top_k must be a non-negative integer, got {self.top_k}")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
    if not penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    # Plain Python numbers: lax.top_k needs an int, and a jax scalar is no hashable static jit argument.
    for name, value in (("temperature", temperature), ("top_k", int(top_k)), ("top_p", top_p),
                        ("repetition_penalty", penalty)):
      object.__setattr__(self, name, value)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _finite(name: str, value) -> float:
  """`value` as a float; a ValueError naming the setting for strings, None, NaN and ±inf (an infinite
  temperature or penalty would flatten the logits into noise rather than fail)."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if isinstance(value, (str, bytes)) or not math.isfinite(number):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return number


def token_presence(ids_BT, vocab_size: int, valid_BT=None):
  """bool [B, V]: which token ids occur in each row (only where valid_BT, e.g. not padding)."""
  b, t = ids_BT.shape
  valid_BT = jnp.ones((b, t), bool) if valid_BT is None else valid_BT
  rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  cols_BT = jnp.where(valid_BT, ids_BT, vocab_size)  # out of range: dropped
  return jnp.zeros((b, vocab_size), bool).at[rows_BT, cols_BT].set(True, mode="drop")


def apply_repetition_penalty(logits_BV, present_BV, penalty: float):
  """For every token present so far: logit < 0 → logit·penalty, else logit/penalty."""
  penalised = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
  return jnp.where(present_BV, penalised, logits_BV)


def top_k_mask(logits_BV, k: int):
  """bool [B, V]: the k largest logits of each row (ties with the k-th value are kept too)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return jnp.ones(logits_BV.shape, bool)
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return logits_BV >= kth_B1


def top_p_mask(logits_BV, p: float):
  """bool [B, V]: the nucleus — the smallest set of most likely tokens whose probability sums to ≥ p.

  A token is kept when the mass of the tokens ranked above it is < p, so the top token always is.
  """
  if p >= 1:
    return jnp.ones(logits_BV.shape, bool)
  b, v = logits_BV.shape
  sorted_BV, order_BV = jax.lax.top_k(logits_BV, v)  # descending
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_sorted_BV = (mass_above_BV < p) & (sorted_BV > -jnp.inf)
  keep_sorted_BV = keep_sorted_BV.at[:, 0].set(True)
  rows_BV = jnp.broadcast_to(jnp.arange(b)[:, None], (b, v))
  return jnp.zeros((b, v), bool).at[rows_BV, order_BV].set(keep_sorted_BV)


def process_logits(logits_BV, cfg: SamplingConfig, present_BV=None):
  """Penalised, tempered and filtered float32 logits (-inf outside top-k / top-p)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.repetition_penalty != 1.0:
    if present_BV is None:
      raise ValueError("repetition_penalty needs the tokens seen so far (present_BV)")
    logits_BV = apply_repetition_penalty(logits_BV, present_BV, cfg.repetition_penalty)
  if cfg.greedy:
    return logits_BV
  logits_BV = logits_BV / cfg.temperature
  if cfg.top_k:
    logits_BV = jnp.where(top_k_mask(logits_BV, cfg.top_k), logits_BV, -jnp.inf)
  if cfg.top_p < 1:
    logits_BV = jnp.where(top_p_mask(logits_BV, cfg.top_p), logits_BV, -jnp.inf)
  return logits_BV


def sample(key, logits_BV, cfg: SamplingConfig, present_BV=None):
  """int32 [B]: the next token of each row (argmax when greedy, else a draw with `key`)."""
  logits_BV = process_logits(logits_BV, cfg, present_BV)
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
