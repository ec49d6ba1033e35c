"""Translation between Hugging Face DeepSeek-V2/V3 `config.json` and ModelConfig.

Keys missing from a config.json take transformers' class defaults, as transformers itself would.
Routing follows transformers' implementations (the parity target): V3 is always sigmoid scoring with
the correction bias and top-2-sum group scores; V2 is softmax scoring with greedy or group-limited
(group max) selection and never renormalises the top-k weights.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import ModelConfig

_V3_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_interleave=True,
    attention_bias=False, num_nextn_predict_layers=1, hidden_act="silu", tie_word_embeddings=False)
_V2_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
    num_hidden_layers=30, num_attention_heads=32, n_shared_experts=2, n_routed_experts=64,
    routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=None, topk_group=None, num_experts_per_tok=None,
    first_k_dense_replace=0, topk_method="greedy", max_position_embeddings=2048, rms_norm_eps=1e-6,
    attention_bias=False, mlp_bias=False, hidden_act="silu", tie_word_embeddings=False)
_ARCHITECTURES = {"deepseek_v3": _V3_DEFAULTS, "deepseek_v2": _V2_DEFAULTS}


# JSON types of the config.json fields we read. A wrong type would otherwise surface far from its cause
# (bool("false") is True; "48" fails deep inside a layer). Null is allowed only where transformers
# accepts it: q_lora_rank null means no q LoRA, elsewhere we use the class default, as for a missing key.
_INT = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim",
        "v_head_dim", "qk_nope_head_dim", "first_k_dense_replace", "max_position_embeddings", "moe_layer_freq")
_INT_OR_NULL = ("q_lora_rank", "n_group", "topk_group", "num_experts_per_tok", "num_key_value_heads",
                "num_nextn_predict_layers", "num_mtp_layers")
_NUMBER = ("routed_scaling_factor", "rms_norm_eps")
_BOOL = ("attention_bias", "mlp_bias", "norm_topk_prob", "rope_interleave", "tie_word_embeddings")
_STR = ("model_type", "hidden_act", "topk_method")
_ROPE = {"rope_type": "str", "type": "str", "rope_theta": "number?", "factor": "number?",
         "original_max_position_embeddings": "int?", "beta_fast": "number?", "beta_slow": "number?",
         "mscale": "number?", "mscale_all_dim": "number?", "attention_factor": "number?", "truncate": "bool?"}
_KIND_TEXT = {"int": "an integer >= 0", "number": "a finite number", "bool": "true or false",
              "str": "a string", "object": "an object"}
_JSON_NAMES = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
               list: "array", dict: "object"}


def _type_ok(value, kind: str) -> bool:
  if kind.endswith("?"):
    return value is None or _type_ok(value, kind[:-1])
  if kind == "int":
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
  if kind == "number":
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  return isinstance(value, {"bool": bool, "str": str, "object": dict}[kind])


def _check(key: str, value, kind: str) -> None:
  if not _type_ok(value, kind):
    want = _KIND_TEXT[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
    got = _JSON_NAMES.get(type(value), type(value).__name__)
    raise ValueError(f"config field {key!r} must be {want}, got {value!r:.80} ({got})")


def check_hf_field_types(hf: dict[str, Any]) -> None:
  """Raises ValueError naming the first field we read whose JSON type is wrong (others are not checked)."""
  kinds = {**{k: "int" for k in _INT}, **{k: "int?" for k in _INT_OR_NULL}, **{k: "number" for k in _NUMBER},
           **{k: "bool" for k in _BOOL}, **{k: "str" for k in _STR}, "rope_theta": "number?",
           "rope_parameters": "object?", "rope_scaling": "object?"}
  for key, kind in kinds.items():
    if key in hf:
      _check(key, hf[key], kind)
  for section in ("rope_parameters", "rope_scaling"):
    for key, kind in _ROPE.items():
      if key in (hf.get(section) or {}):
        _check(f"{section}.{key}", hf[section][key], kind)


def _need_int(c: dict[str, Any], key: str, why: str) -> int:
  if c[key] is None:  # a null, or a V2 default that has no value of its own
    raise ValueError(f"config field {key!r} must be set to an integer {why}")
  return c[key]


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Reads either `rope_parameters` (transformers ≥ 5) or `rope_scaling` + top-level `rope_theta`."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = next((t for t in (params.get("rope_theta"), hf.get("rope_theta")) if t is not None), 10000.0)
  fields: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type == "default":
    return fields
  if rope_type != "yarn":
    raise ValueError(f"unsupported rope type {rope_type!r}: only default and yarn are implemented")
  original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
  if not original:
    raise ValueError("YaRN needs original_max_position_embeddings > 0")
  factor = params.get("factor")
  if factor is None:
    factor = hf["max_position_embeddings"] / original
  fields.update(
      rope_factor=float(factor), original_max_position_embeddings=int(original),
      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
      mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
      rope_attention_factor=params.get("attention_factor"), yarn_truncate=bool(params.get("truncate", True)))
  return fields


def model_config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig for a transformers DeepseekV2/V3 config dict; overrides set e.g. dtypes or backends."""
  model_type = hf.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"unsupported architecture model_type={model_type!r} "
                     f"(architectures={hf.get('architectures')}); expected one of {sorted(_ARCHITECTURES)}")
  check_hf_field_types(hf)  # nulls left after this stand for the default
  c = {**_ARCHITECTURES[model_type], **{k: v for k, v in hf.items() if v is not None or k == "q_lora_rank"}}
  if c["num_hidden_layers"] > c["first_k_dense_replace"]:
    _need_int(c, "num_experts_per_tok", "for MoE layers")
  if c["hidden_act"] != "silu":
    raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}; DeepSeek uses silu")
  if c["tie_word_embeddings"]:
    raise ValueError("tied word embeddings are not supported (DeepSeek's head is untied)")
  if c.get("num_key_value_heads") not in (None, c["num_attention_heads"]):
    raise ValueError("MLA needs num_key_value_heads == num_attention_heads")
  if c.get("moe_layer_freq", 1) != 1:
    raise ValueError("moe_layer_freq != 1 is not supported (every layer after the dense prefix is MoE)")
  fields = dict(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
      num_heads=c["num_attention_heads"], q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
      qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
      v_head_dim=c["v_head_dim"], attention_bias=bool(c["attention_bias"]),
      first_k_dense=min(c["first_k_dense_replace"], c["num_hidden_layers"]),
      dense_intermediate_size=c["intermediate_size"], mlp_bias=bool(c.get("mlp_bias", False)),
      n_routed_experts=c["n_routed_experts"], n_shared_experts=c["n_shared_experts"],
      moe_intermediate_size=c["moe_intermediate_size"], num_experts_per_tok=c["num_experts_per_tok"],
      routed_scaling_factor=float(c["routed_scaling_factor"]),
      max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=float(c["rms_norm_eps"]),
      **_rope_fields(c))
  if model_type == "deepseek_v3":
    fields.update(score_func="sigmoid", router_bias=True, group_score="top2_sum",
                  n_group=c["n_group"], topk_group=c["topk_group"], norm_topk_prob=bool(c["norm_topk_prob"]),
                  rope_interleave=bool(c["rope_interleave"]),
                  mtp_depth=int(c.get("num_mtp_layers", c["num_nextn_predict_layers"]) or 0))
  else:
    method = c["topk_method"]
    if method not in ("greedy", "group_limited_greedy"):
      raise ValueError(f"unsupported V2 topk_method {method!r}")
    grouped = method == "group_limited_greedy"
    fields.update(score_func="softmax", router_bias=False, group_score="max",
                  n_group=_need_int(c, "n_group", f"for {method}") if grouped else 1,
                  topk_group=_need_int(c, "topk_group", f"for {method}") if grouped else 1,
                  norm_topk_prob=False, rope_interleave=True, mtp_depth=0)
  fields.update(overrides)
  return ModelConfig(**fields)


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers config.json dict (new-style `rope_parameters`) describing `cfg`."""
  v3 = cfg.score_func == "sigmoid"
  if not v3 and (cfg.router_bias or cfg.norm_topk_prob or cfg.mtp_depth):
    raise ValueError("softmax routing with a router bias, top-k renormalisation or MTP has no HF layout")
  if v3 and (not cfg.router_bias or cfg.group_score != "top2_sum" or cfg.mlp_bias):
    raise ValueError("sigmoid routing must use the router bias and top-2-sum groups to export as V3")
  rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "yarn":
    rope.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_max_position_embeddings,
                beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                mscale_all_dim=cfg.mscale_all_dim, truncate=cfg.yarn_truncate)
    if cfg.rope_attention_factor is not None:
      rope["attention_factor"] = cfg.rope_attention_factor
  hf = dict(
      model_type="deepseek_v3" if v3 else "deepseek_v2",
      architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank,
      kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=cfg.attention_bias,
      first_k_dense_replace=cfg.first_k_dense, intermediate_size=cfg.dense_intermediate_size,
      n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
      moe_intermediate_size=cfg.moe_intermediate_size, num_experts_per_tok=cfg.num_experts_per_tok,
      routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      hidden_act="silu", tie_word_embeddings=False, rope_parameters=rope, torch_dtype="float32")
  if v3:
    hf.update(norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
              num_nextn_predict_layers=cfg.mtp_depth, scoring_func="sigmoid", topk_method="noaux_tc")
  else:
    hf.update(topk_method="group_limited_greedy" if cfg.n_group > 1 else "greedy", mlp_bias=cfg.mlp_bias,
              norm_topk_prob=False, scoring_func="softmax")
  return hf
