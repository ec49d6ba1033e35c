"""Tiny V3- and V2-Lite-style models for the inference tests, with symmetry-breaking weights.

init_std is large so router scores and greedy choices are decisive (float32 noise cannot flip them);
norm scales and router biases are random so a dropped norm weight or bias would show. Prompt +
generated lengths (up to 16) run past YaRN's original length 8.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.router import RouterBias

_COMMON = dict(hidden_size=32, num_layers=3, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=12, first_k_dense=1, dense_intermediate_size=48,
               moe_intermediate_size=16, max_position_embeddings=32, init_std=0.3)


def v3_style(**overrides) -> models.ModelConfig:
  """q LoRA, sigmoid scores + selection bias, top-2-sum groups, YaRN (mscale ≠ mscale_all_dim), MTP."""
  return models.ModelConfig(**dict(
      _COMMON, vocab_size=96, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=2, score_func="sigmoid", router_bias=True, n_group=4, topk_group=2,
      group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5, rope_type="yarn",
      rope_factor=4.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=0.8, mtp_depth=1,
      **overrides))


def v2_lite_style(**overrides) -> models.ModelConfig:
  """A single wq projection, softmax scores, greedy top-k without renormalisation, 2 shared experts."""
  return models.ModelConfig(**dict(
      _COMMON, vocab_size=80, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
      num_experts_per_tok=3, score_func="softmax", router_bias=False, norm_topk_prob=False,
      routed_scaling_factor=1.0, **overrides))


STYLES = {"v3": v3_style, "v2_lite": v2_lite_style}


def build(cfg: models.ModelConfig, seed: int = 0) -> models.Transformer:
  """A model with N(0, init_std) weights, norm scales 1 + 0.2·N(0,1) and router biases 0.1·N(0,1).

  Filled from numpy over an abstract model: initialising eagerly compiles one truncated-normal
  kernel per parameter shape (~10 s of CPU), which would dominate these tests.
  """
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape = var.get_value().shape
    if isinstance(var, RouterBias):
      value = 0.1 * rng.standard_normal(shape)
    elif str(path[-1]) == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      value = cfg.init_std * rng.standard_normal(shape)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def prompts(cfg: models.ModelConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)
