"""Shared pieces of the sharding tests: 8 fake CPU devices, a tiny model, meshes and comparisons.

Every tests/sharding module imports this module first, so `chex.set_n_cpu_devices(8)` runs before
anything touches JAX in that process, whichever module a pytest(-xdist) worker collects first. Other
test modules in the same worker then see 8 CPU devices too (their default device is still device 0).
If some module started a JAX backend at import time with another device count, the sharding tests
skip and say so (`require_devices`) instead of breaking collection.
"""

from __future__ import annotations

import zlib

import chex

NUM_DEVICES = 8
try:
  chex.set_n_cpu_devices(NUM_DEVICES)
except RuntimeError:  # a backend already runs with another device count; see require_devices
  pass

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from models.router import RouterBias  # noqa: E402

# data=2, fsdp=2, expert=2 and a tensor-parallel variant (each a full 8-device mesh).
MESHES = {
    "dp_fsdp_ep": dict(data=2, fsdp=2, expert=2, tensor=1),
    "dp_ep_tp": dict(data=2, fsdp=1, expert=2, tensor=2),
}


def require_devices(test):
  if jax.device_count() < NUM_DEVICES:
    test.skipTest(f"needs {NUM_DEVICES} devices, found {jax.device_count()}: a JAX backend was "
                  "initialised before chex.set_n_cpu_devices(8) ran in this process")


def tiny_config(**overrides) -> models.ModelConfig:
  """V3-style (q LoRA, sigmoid + bias, 2 groups, MTP), sized so every sharded dim divides 2.

  init_std is large so top-k routing margins dwarf float32 reduction-order noise.
  """
  fields = dict(
      vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, q_lora_rank=16, kv_lora_rank=16,
      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense=1, dense_intermediate_size=48,
      n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=2,
      score_func="sigmoid", router_bias=True, n_group=2, topk_group=1, group_score="top2_sum",
      norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=64, mtp_depth=1,
      init_std=0.3, dtype=jnp.float32, param_dtype=jnp.float32)
  fields.update(overrides)
  return models.ModelConfig(**fields)


def randomize(state, seed: int):
  """Norm scales 1 + 0.2·u and router biases 0.1·u with u a fixed pseudo-random pattern in [-1.7, 1.7],
  so a dropped or misplaced one shows. (No PRNG: cheaper to compile inside a jitted init.)"""

  def pattern(shape, salt):
    i = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    return 1.7 * jnp.sin(12.9898 * i + 78.233 * (seed + salt))

  def one(path, var):
    name = jax.tree_util.keystr(path)
    salt = zlib.crc32(name.encode()) % 1000
    value = var.get_value()
    if isinstance(var, RouterBias):
      return var.replace((0.1 * pattern(value.shape, salt)).astype(value.dtype))
    if name.endswith("['scale']"):  # every RMSNorm
      return var.replace((1.0 + 0.2 * pattern(value.shape, salt)).astype(value.dtype))
    return var

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tokens(batch: int, length: int, vocab: int, seed: int = 0):
  """Token ids and packed-document segment ids (two documents, then padding) [B, T]."""
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)
  pos = np.arange(length)
  segments = np.where(pos < length // 2, 1, np.where(pos < length - 1, 2, 0))
  return ids, jnp.asarray(np.broadcast_to(segments, (batch, length)).astype(np.int32))


def assert_close_rel(test, actual, expected, rtol: float, what: str = ""):
  """max |actual − expected| ≤ rtol · max |expected| for every leaf pair."""
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  test.assertEqual(len(flat_a), len(flat_e))
  for (path, a), e in zip(flat_a, flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-12)
    err = float(np.max(np.abs(a - e))) if e.size else 0.0
    test.assertLessEqual(err, rtol * scale,
                         f"{what}{jax.tree_util.keystr(path)}: max |Δ| {err:.3g} > {rtol} × {scale:.3g}")
