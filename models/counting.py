"""Parameter and FLOP accounting, read off the real module shapes (abstractly: nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from models.config import ModelConfig
from models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int  # main model, embedding and head included, MTP excluded (as DeepSeek reports)
  activated: int  # per token: input embedding excluded, head included, top-k of the routed experts
  embedding: int
  routed_experts: int
  mtp: int  # the MTP module's own weights (it shares the embedding and head)
  mtp_activated: int  # of those, used per token (top-k of its routed experts)
  by_component: dict[str, int]
  # Of `activated` and `mtp_activated`, the matrices (norm scales and biases excluded): each such
  # weight costs 2 FLOPs per token forward and 4 backward, the 6N of the training FLOP count.
  activated_matmul: int
  mtp_activated_matmul: int


def count_params(cfg: ModelConfig) -> ParamCounts:
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  total = activated = embedding = routed = mtp = mtp_activated = 0
  activated_matmul = mtp_activated_matmul = 0
  by_component: dict[str, int] = {}
  k_over_e = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size = math.prod(var.get_value().shape)
    names = [str(p) for p in path]
    component = "/".join("norms" if n in ("attn_norm", "ffn_norm") else n for n in names[:3])
    by_component[component] = by_component.get(component, 0) + size
    share = k_over_e if "experts" in names else 1.0
    # A matrix has two axes besides the stacked-layer one; norm scales and biases have one.
    matrix = sum(a != "layers" for a in var.get_metadata()["out_sharding"]) >= 2
    if names[0] == "mtp":
      mtp += size
      mtp_activated += size * share
      mtp_activated_matmul += size * share * matrix
      continue
    total += size
    if names == ["embed"]:
      embedding += size
    else:
      routed += size if "experts" in names else 0
      activated += size * share
      activated_matmul += size * share * matrix
  return ParamCounts(total, round(activated), embedding, routed, mtp, round(mtp_activated), by_component,
                     round(activated_matmul), round(mtp_activated_matmul))


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of QKᵀ and PV per token for causal attention (mean context seq_len/2)."""
  per_layer = 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len / 2)
  return per_layer * (cfg.num_layers + cfg.mtp_depth)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
  """6·(activated matmul params) + 3·attention: forward + backward FLOPs per trained token.

  The input embedding is a lookup (no FLOPs); the MTP block and its head matmul count when trained.
  """
  counts = count_params(cfg)
  matmul_params = counts.activated_matmul
  attention = attention_flops_per_token(cfg, seq_len)
  if with_mtp and cfg.mtp_depth:
    matmul_params += counts.mtp_activated_matmul + cfg.hidden_size * cfg.vocab_size  # MTP block + shared head
  else:
    attention *= cfg.num_layers / (cfg.num_layers + cfg.mtp_depth)
  return 6 * matmul_params + 3 * attention


def cache_values_per_token(cfg: ModelConfig) -> tuple[int, int]:
  """(latent MLA cache, expanded multi-head K/V cache) values per token per layer."""
  latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  expanded = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  return latent, expanded
