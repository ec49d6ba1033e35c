"""Preallocated decode caches for every layer, stacked like the model's layer stacks.

Two layouts (`kind`):
- "latent" (default, MLA's absorbed cache): per token per layer only kv_norm(c) [R] and the roped
  shared rope key k_pe [Kr], i.e. R + Kr values (V3: 512 + 64 = 576). Decoding folds W_UK into the
  query and W_UV into the output, so keys and values are never expanded.
- "expanded" (naive multi-head cache): per-head keys [H, Kn+Kr] and values [H, Kv]
  (V3: 128·(192 + 128) = 40960 values), as an MHA cache would hold them.

A `KVCache` holds one entry per stack (`dense`, `moe`; None when the model has no such layers), each a
dict of arrays with a leading layer axis [L, B, S, ...] matching `Transformer.dense_layers` /
`moe_layers`, plus `lengths` [B]: how many positions of each row are filled. Rows are right-padded:
row b's token at position p lives in slot p. MTP is not used for decoding and gets no cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from models.config import ModelConfig

CacheKind = Literal["latent", "expanded"]
KINDS = ("latent", "expanded")


class KVCache(NamedTuple):
  dense: dict[str, jax.Array] | None  # [L_dense, B, S, ...] per entry
  moe: dict[str, jax.Array] | None  # [L_moe, B, S, ...] per entry
  lengths: jax.Array  # int32 [B]: filled positions per row

  @property
  def kind(self) -> CacheKind:
    stack = self.dense if self.dense is not None else self.moe
    return "latent" if "c" in stack else "expanded"

  @property
  def max_length(self) -> int:
    stack = self.dense if self.dense is not None else self.moe
    return next(iter(stack.values())).shape[2]


def entry_shapes(cfg: ModelConfig, kind: CacheKind = "latent") -> dict[str, tuple[int, ...]]:
  """Per token per layer: the shape of every cached entry."""
  if kind == "latent":
    return {"c": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)}
  if kind == "expanded":
    return {"k": (cfg.num_heads, cfg.qk_head_dim), "v": (cfg.num_heads, cfg.v_head_dim)}
  raise ValueError(f"unknown cache kind {kind!r}; expected one of {KINDS}")


def init_cache(cfg: ModelConfig, batch: int, max_length: int, kind: CacheKind = "latent",
               dtype=None) -> KVCache:
  """Zeroed caches for `batch` rows of `max_length` positions (dtype defaults to cfg.dtype)."""
  dtype = cfg.dtype if dtype is None else dtype
  shapes = entry_shapes(cfg, kind)

  def stack(num_layers):
    if num_layers == 0:
      return None
    return {n: jnp.zeros((num_layers, batch, max_length) + s, dtype) for n, s in shapes.items()}

  return KVCache(stack(cfg.first_k_dense), stack(cfg.num_moe_layers), jnp.zeros((batch,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class CacheReport:
  latent_values: int  # per token per layer
  expanded_values: int  # per token per layer
  num_layers: int  # layers holding a cache (MTP excluded)
  latent_bytes_per_token: int  # all layers
  expanded_bytes_per_token: int  # all layers
  dtype: str

  @property
  def ratio(self) -> float:
    """How many times smaller the latent cache is."""
    return self.expanded_values / self.latent_values

  def __str__(self):
    return (f"cache per token per layer: {self.latent_values} latent vs {self.expanded_values} expanded "
            f"values ({self.ratio:.1f}x); per token over {self.num_layers} layers in {self.dtype}: "
            f"{self.latent_bytes_per_token / 1024:.1f} KiB vs {self.expanded_bytes_per_token / 1024:.1f} KiB")


def _per_token(cache: KVCache) -> tuple[int, int, int]:
  """(values per token per layer, layers, bytes per token over all layers) read off cache arrays."""
  values = layers = nbytes = 0
  for stack in (cache.dense, cache.moe):
    if stack is None:
      continue
    per_layer = sum(math.prod(a.shape[3:]) for a in stack.values())
    values = per_layer
    num = next(iter(stack.values())).shape[0]
    layers += num
    nbytes += num * sum(math.prod(a.shape[3:]) * jnp.dtype(a.dtype).itemsize for a in stack.values())
  return values, layers, nbytes


def cache_report(cfg: ModelConfig, dtype=None) -> CacheReport:
  """Cache sizes per token for both layouts, from abstract caches (nothing is allocated)."""
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  latent = _per_token(jax.eval_shape(lambda: init_cache(cfg, 1, 1, "latent", dtype)))
  expanded = _per_token(jax.eval_shape(lambda: init_cache(cfg, 1, 1, "expanded", dtype)))
  return CacheReport(latent[0], expanded[0], latent[1], latent[2], expanded[2], dtype.name)


def cache_bytes(cfg: ModelConfig, batch: int, max_length: int, kind: CacheKind = "latent", dtype=None) -> int:
  """Bytes of a whole cache for `batch` rows of `max_length` positions."""
  _, _, per_token = _per_token(jax.eval_shape(lambda: init_cache(cfg, 1, 1, kind, dtype)))
  return per_token * batch * max_length
