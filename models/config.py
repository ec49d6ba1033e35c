"""The frozen model configuration every layer receives.

Shape letters used in tensor names throughout `models/`:
  B batch, T query length, S key length, D model dim (hidden_size), H attention heads,
  K head dim (Kn: qk_nope, Kr: qk_rope, Kv: v), R latent rank (kv_lora / q_lora),
  E routed experts, F ffn width, V vocab, L stacked layers, N flattened tokens (B*T),
  A expert assignments (N*top_k), C expert capacity, G expert groups.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture of a DeepSeek-V2/V3 style model. Immutable; built once per run."""

  vocab_size: int
  hidden_size: int
  num_layers: int  # decoder layers, MTP excluded
  num_heads: int
  # Multi-head latent attention.
  q_lora_rank: int | None  # None: a single wq projection (V2-Lite)
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  attention_bias: bool = False  # bias on wq_a, wkv_a and wo (HF `attention_bias`)
  # Feed-forward: the first `first_k_dense` layers are dense, the rest MoE.
  first_k_dense: int
  dense_intermediate_size: int
  mlp_bias: bool = False  # bias on dense and shared-expert MLPs (HF V2 `mlp_bias`)
  n_routed_experts: int
  n_shared_experts: int
  moe_intermediate_size: int
  num_experts_per_tok: int
  score_func: Literal["sigmoid", "softmax"] = "sigmoid"
  router_bias: bool = True  # aux-loss-free selection bias (V3 e_score_correction_bias)
  n_group: int = 1
  topk_group: int = 1
  group_score: Literal["top2_sum", "max"] = "top2_sum"  # V3 sums the top 2 per group; V2 takes the max
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  # Positions.
  max_position_embeddings: int
  rope_theta: float = 10000.0
  rope_interleave: bool = True  # rotate adjacent pairs (DeepSeek); False: rotate halves
  rope_type: Literal["default", "yarn"] = "default"
  rope_factor: float = 1.0
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  rope_attention_factor: float | None = None  # None: derived from factor/mscale as YaRN does
  yarn_truncate: bool = True
  # Multi-token prediction and the rest.
  mtp_depth: int = 0
  rms_norm_eps: float = 1e-6
  latent_norm_eps: float = 1e-6  # q/kv latent norms always use 1e-6 in the reference and HF
  init_std: float = 0.006
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    problems = _type_problems(self)
    if problems:  # the checks below would trip over a wrong type: report the types first
      raise ValueError("ModelConfig: " + "; ".join(problems))
    for key in _DTYPE_FIELDS:  # one canonical form ("bfloat16", jnp.bfloat16 → dtype) for ==, hash, to_dict
      object.__setattr__(self, key, jnp.dtype(getattr(self, key)))
    problems = _range_problems(self)

    def need(ok, msg):
      if not ok:
        problems.append(msg)

    need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
    need(0 <= self.first_k_dense <= self.num_layers, "first_k_dense must lie in [0, num_layers]")
    if self.num_moe_layers or self.mtp_depth:
      need(self.n_group >= 1 and self.topk_group >= 1, f"n_group ({self.n_group}) and topk_group "
           f"({self.topk_group}) must be >= 1 (1 = no group-limited routing)")
      need(self.n_routed_experts > 0, "MoE layers need n_routed_experts > 0")
      need(self.moe_intermediate_size > 0, "MoE layers need moe_intermediate_size > 0")
      need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
           f"num_experts_per_tok (top-k) {self.num_experts_per_tok} must be in [1, n_routed_experts="
           f"{self.n_routed_experts}]")
      if self.n_group >= 1 and self.topk_group >= 1:
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
        need(1 <= self.topk_group <= self.n_group, "topk_group must be in [1, n_group]")
        need(self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
             "the kept groups hold fewer experts than top-k (topk_group × experts per group < "
             "num_experts_per_tok)")
        if self.n_group > 1 and self.group_score == "top2_sum":
          need(self.n_routed_experts // self.n_group >= 2, "top2_sum group score needs >= 2 experts per group")
    if self.first_k_dense:
      need(self.dense_intermediate_size > 0, "dense layers need dense_intermediate_size > 0")
    need(self.score_func in ("sigmoid", "softmax"), f"unknown score_func {self.score_func!r}")
    need(self.group_score in ("top2_sum", "max"), f"unknown group_score {self.group_score!r}")
    need(self.rope_type in ("default", "yarn"), f"unsupported rope_type {self.rope_type!r}")
    if self.rope_type == "yarn":
      need(self.original_max_position_embeddings, "YaRN needs original_max_position_embeddings")
    need(self.mtp_depth in (0, 1), "only MTP depth 0 or 1 is implemented (mtp_depth)")
    for key in _DTYPE_FIELDS:
      need(jnp.issubdtype(getattr(self, key), jnp.floating), f"{key} must be a floating dtype, got "
           f"{getattr(self, key).name}")
    if problems:
      raise ValueError("ModelConfig: " + "; ".join(problems))

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense

  @property
  def yarn_factor(self) -> float:
    """The YaRN context-extension factor s."""
    return self.rope_factor

  @property
  def softmax_scale(self) -> float:
    """1/sqrt(qk head dim), times mscale(mscale_all_dim)^2 under YaRN (as DeepSeek and HF do)."""
    scale = self.qk_head_dim ** -0.5
    if self.rope_type == "yarn" and self.mscale_all_dim:
      m = yarn_mscale(self.yarn_factor, self.mscale_all_dim)
      scale *= m * m
    return scale

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON-able fields, dtypes by name; `from_dict(cfg.to_dict()) == cfg`."""
    d = dataclasses.asdict(self)
    for key in _DTYPE_FIELDS:
      d[key] = jnp.dtype(d[key]).name
    return d


_DTYPE_FIELDS = ("dtype", "param_dtype")
# Smallest value of each numeric field (None fields skip it); the architecture checks then see sane numbers.
_AT_LEAST_ONE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "original_max_position_embeddings")
_POSITIVE = ("rope_theta", "rope_factor", "rms_norm_eps", "latent_norm_eps", "init_std", "routed_scaling_factor",
             "beta_fast", "beta_slow", "rope_attention_factor")


def _type_problems(cfg: ModelConfig) -> list[str]:
  """Each field against its annotation: ints are ints (not bools or strings), floats finite numbers,
  bools bools, dtypes names numpy knows."""
  problems = []
  for f in dataclasses.fields(cfg):
    value, kind = getattr(cfg, f.name), str(f.type)
    if value is None and "None" in kind:
      continue
    if kind.startswith("int"):
      ok = isinstance(value, int) and not isinstance(value, bool)
      what = "an integer"
    elif kind.startswith("float"):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      what = "a finite number"
    elif kind == "bool":
      ok, what = isinstance(value, bool), "true or false"
    elif f.name in _DTYPE_FIELDS:
      try:
        jnp.dtype(value)
        ok = True
      except TypeError:
        ok = False
      what = "a dtype name such as 'bfloat16' or 'float32'"
    else:
      continue
    if not ok:
      problems.append(f"{f.name} must be {what}, got {value!r}")
  return problems


def _range_problems(cfg: ModelConfig) -> list[str]:
  problems = []
  for name in _AT_LEAST_ONE:
    value = getattr(cfg, name)
    if value is not None and value < 1:
      problems.append(f"{name} must be >= 1, got {value}")
  for name in _POSITIVE:
    value = getattr(cfg, name)
    if value is not None and value <= 0:
      problems.append(f"{name} must be > 0, got {value}")
  for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
               "dense_intermediate_size", "num_experts_per_tok", "first_k_dense", "mtp_depth", "mscale",
               "mscale_all_dim"):
    if getattr(cfg, name) < 0:
      problems.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
  return problems


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature correction 0.1·m·ln(s) + 1 (1 when not extending)."""
  if factor <= 1:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


def from_dict(d: dict) -> ModelConfig:
  """Builds a ModelConfig from a plain mapping (`ModelConfig.to_dict()`, a config file's
  `config.model.to_dict()`); dtypes may be names ("bfloat16") or dtypes. Unknown fields are errors."""
  d = dict(d)
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    hint = ""
    if set(unknown) & {"moe_backend", "capacity_factor", "attention_impl", "remat_policy"}:
      hint = " (execution settings live in the config's `execution` section: models.Execution)"
    raise ValueError(f"unknown model config fields: {unknown}{hint}")
  return ModelConfig(**d)
