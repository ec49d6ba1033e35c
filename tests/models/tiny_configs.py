"""Tiny DeepSeek-style configs and model builders shared by the model tests.

Every factory takes keyword overrides (`v3_style(n_group=1)`). The sizes keep a forward
and backward pass of a 3-layer model cheap on a CPU while still having several heads, expert groups
and a YaRN ramp that matters at the test lengths (original context 8 < T). `init_std` is large so
router scores are far apart and top-k choices are decisive.

Tests build models with `build`, which fills an abstract (`nnx.eval_shape`) model from numpy: eager
initialisation compiles one random-number kernel per parameter shape, which costs seconds per test
process on a CPU. For the same reason XLA's CPU backend optimisation is turned down below; it changes
compile time only, not floating-point semantics.
"""

from __future__ import annotations

import functools
import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from models.layers import RMSNorm  # noqa: E402
from models.router import RouterBias  # noqa: E402

_COMMON = dict(
    hidden_size=32, num_layers=3, num_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, first_k_dense=1, dense_intermediate_size=48,
    moe_intermediate_size=16, max_position_embeddings=64, init_std=0.3)


def v3_style(**overrides) -> models.ModelConfig:
  """V3: q LoRA, sigmoid scores + selection bias, top-2-sum groups (4 groups, keep 2), YaRN, MTP."""
  fields = dict(
      _COMMON, vocab_size=96, q_lora_rank=16, n_routed_experts=16, n_shared_experts=1,
      num_experts_per_tok=4, score_func="sigmoid", router_bias=True, n_group=4, topk_group=2,
      group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5,
      rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=8, mscale=1.0,
      mscale_all_dim=0.8, mtp_depth=1)
  fields.update(overrides)
  return models.ModelConfig(**fields)


def v2_lite_style(**overrides) -> models.ModelConfig:
  """V2-Lite: a single wq projection, softmax scores, greedy top-k, no bias, no renormalisation."""
  fields = dict(
      _COMMON, vocab_size=80, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
      num_experts_per_tok=3, score_func="softmax", router_bias=False, n_group=1, topk_group=1, group_score="max",
      norm_topk_prob=False, routed_scaling_factor=1.0)
  fields.update(overrides)
  return models.ModelConfig(**fields)


def v2_style(**overrides) -> models.ModelConfig:
  """V2: q LoRA, softmax scores, group-limited greedy with group max (4 groups, keep 2), scale 16."""
  fields = dict(
      _COMMON, vocab_size=112, q_lora_rank=16, n_routed_experts=16, n_shared_experts=2,
      num_experts_per_tok=4, score_func="softmax", router_bias=False, n_group=4, topk_group=2,
      group_score="max", norm_topk_prob=False, routed_scaling_factor=16.0)
  fields.update(overrides)
  return models.ModelConfig(**fields)


STYLES = {"v3": v3_style, "v2_lite": v2_lite_style, "v2": v2_style}


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
  """Sets every RMSNorm scale to 1 + 0.2·N(0,1) and every router bias to 0.1·N(0,1), in place.

  Freshly initialised norms are all ones and biases all zeros, so without this a test could not tell
  a dropped norm weight or an ignored bias from a correct one.
  """
  rng = np.random.default_rng(seed)
  norm_paths = {path + ("scale",) for path, node in nnx.iter_graph(model) if isinstance(node, RMSNorm)}
  state = nnx.state(model)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if isinstance(var, RouterBias):
      var.set_value(jnp.asarray(0.1 * rng.standard_normal(shape), dtype))
    elif tuple(path) in norm_paths:
      var.set_value(jnp.asarray(1.0 + 0.2 * rng.standard_normal(shape), dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def materialize(factory, cfg: models.ModelConfig, seed: int = 0, *, randomized: bool = True,
                std: float | None = None):
  """Builds `factory()` abstractly and fills every parameter with a clipped N(0, std) from numpy
  (std defaults to cfg.init_std; norm scales 1, router biases 0), then `randomize`s norms and biases
  unless told not to."""
  abstract = nnx.eval_shape(factory)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for _, var in flat:
    sds = var.get_value()
    value = np.clip(rng.standard_normal(sds.shape), -3, 3) * (cfg.init_std if std is None else std)
    if isinstance(var, RouterBias):
      value = np.zeros(sds.shape)
    var.set_value(jnp.asarray(value, sds.dtype))
  module = nnx.merge(graphdef, nnx.from_flat_state(flat))
  for _, node in nnx.iter_graph(module):
    if isinstance(node, RMSNorm):
      node.scale.set_value(jnp.ones_like(node.scale.get_value()))
  return randomize(module, seed + 1000) if randomized else module


def build(cfg: models.ModelConfig, seed: int = 0, *, randomized: bool = True,
          std: float | None = None) -> models.Transformer:
  """A Transformer for `cfg` with seeded random weights (same seed and shapes → same weights)."""
  return materialize(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)), cfg, seed, randomized=randomized,
                     std=std)


@functools.partial(jax.jit, static_argnames=("graphdef", "with_mtp", "execution"))
def _forward(graphdef, state, ids, positions, segment_ids, with_mtp, execution):
  return nnx.merge(graphdef, state).forward(ids, positions, segment_ids, with_mtp=with_mtp, execution=execution)


def forward(model: models.Transformer, ids, positions=None, segment_ids=None, *,
            with_mtp: bool = False, execution: models.Execution | None = None) -> models.ModelOutput:
  """`model.forward` under one shared jit, so tests with equal graphs and shapes compile once."""
  graphdef, state = nnx.split(model)
  return _forward(graphdef, state, jnp.asarray(ids), positions, segment_ids, with_mtp,
                  execution or models.Execution())


def random_ids(cfg: models.ModelConfig, shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)
