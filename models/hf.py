"""Import and export of Hugging Face DeepSeek-V2/V3 checkpoints (config.json + safetensors).

    model = models.load_hf_checkpoint("/path/to/DeepSeek-V3", dtype=jnp.bfloat16)
    models.save_hf_checkpoint(model, "/path/to/out")

HF stores linear weights as [out, in]; we store [in, ...out] with heads split out, stacked over layers.
FP8 (e4m3) weights are dequantised on load with their 128×128 `weight_scale_inv` block scales.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import safetensors_io
from models.config import ModelConfig
from models.hf_config import check_hf_field_types, model_config_from_hf, model_config_to_hf
from models.safetensors_io import CheckpointError  # re-exported as models.CheckpointError
from models.transformer import Transformer

Path = tuple[str, ...]


def _block_table(cfg: ModelConfig, moe: bool) -> list[tuple[str, Path, Callable, Callable]]:
  """(HF name under a layer prefix, our path inside a DecoderBlock, hf→ours, ours→hf)."""
  h, d = cfg.num_heads, cfg.hidden_size
  same = (lambda w: w, lambda p: p)
  t = (lambda w: w.T, lambda p: p.T)
  heads_out = lambda k: (lambda w: w.T.reshape(w.shape[1], h, k), lambda p: p.reshape(p.shape[0], -1).T)
  heads_in = (lambda w: w.T.reshape(h, cfg.v_head_dim, d), lambda p: p.reshape(-1, d).T)
  rows = [("input_layernorm.weight", ("attn_norm", "scale"), *same),
          ("post_attention_layernorm.weight", ("ffn_norm", "scale"), *same),
          ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), *t),
          ("self_attn.kv_a_layernorm.weight", ("attn", "kv_norm", "scale"), *same),
          ("self_attn.kv_b_proj.weight", ("attn", "wkv_b"), *heads_out(cfg.qk_nope_head_dim + cfg.v_head_dim)),
          ("self_attn.o_proj.weight", ("attn", "wo"), *heads_in)]
  if cfg.q_lora_rank is None:
    rows.append(("self_attn.q_proj.weight", ("attn", "wq"), *heads_out(cfg.qk_head_dim)))
  else:
    rows += [("self_attn.q_a_proj.weight", ("attn", "wq_a"), *t),
             ("self_attn.q_a_layernorm.weight", ("attn", "q_norm", "scale"), *same),
             ("self_attn.q_b_proj.weight", ("attn", "wq_b"), *heads_out(cfg.qk_head_dim))]
  if cfg.attention_bias:
    if cfg.q_lora_rank is not None:
      rows.append(("self_attn.q_a_proj.bias", ("attn", "wq_a_bias"), *same))
    rows += [("self_attn.kv_a_proj_with_mqa.bias", ("attn", "wkv_a_bias"), *same),
             ("self_attn.o_proj.bias", ("attn", "wo_bias"), *same)]

  def mlp_rows(hf_prefix, path):
    out = [(f"{hf_prefix}.{n}_proj.weight", path + (n,), *t) for n in ("gate", "up", "down")]
    if cfg.mlp_bias:
      out += [(f"{hf_prefix}.{n}_proj.bias", path + (f"{n}_bias",), *same) for n in ("gate", "up", "down")]
    return out

  if not moe:
    return rows + mlp_rows("mlp", ("ffn",))
  rows.append(("mlp.gate.weight", ("ffn", "router", "kernel"), *t))
  if cfg.router_bias:
    rows.append(("mlp.gate.e_score_correction_bias", ("ffn", "router", "bias"), *same))
  if cfg.n_shared_experts or cfg.mlp_bias:
    rows += mlp_rows("mlp.shared_experts", ("ffn", "shared"))
  for e in range(cfg.n_routed_experts):
    for n in ("gate", "up", "down"):
      rows.append((f"mlp.experts.{e}.{n}_proj.weight", ("ffn", "experts", n, e), *t))
  return rows


def _layout(cfg: ModelConfig):
  """Yields (hf_name, our_path, hf→ours, ours→hf); an int in our path indexes a stacked axis."""
  same, t = (lambda w: w, lambda p: p), (lambda w: w.T, lambda p: p.T)
  yield "model.embed_tokens.weight", ("embed",), *same
  yield "model.norm.weight", ("final_norm", "scale"), *same
  yield "lm_head.weight", ("lm_head",), *t
  for i in range(cfg.num_layers):
    moe = i >= cfg.first_k_dense
    stack, j = ("moe_layers", i - cfg.first_k_dense) if moe else ("dense_layers", i)
    for name, path, to_ours, to_hf in _block_table(cfg, moe):
      yield f"model.layers.{i}.{name}", (stack, j) + path, to_ours, to_hf
  if cfg.mtp_depth:
    n = cfg.num_layers
    yield f"model.layers.{n}.enorm.weight", ("mtp", "enorm", "scale"), *same
    yield f"model.layers.{n}.hnorm.weight", ("mtp", "hnorm", "scale"), *same
    yield f"model.layers.{n}.eh_proj.weight", ("mtp", "eh_proj"), *t
    yield f"model.layers.{n}.shared_head.norm.weight", ("mtp", "norm", "scale"), *same
    for name, path, to_ours, to_hf in _block_table(cfg, moe=True):
      yield f"model.layers.{n}.{name}", ("mtp", "block") + path, to_ours, to_hf


_INDEX = "model.safetensors.index.json"


def _load_json(path: str, what: str):
  """Parses a JSON file that must hold an object; errors name the file."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except OSError as e:  # e.g. a directory where the file should be
    raise CheckpointError(f"{path}: cannot read {what}: {e.strerror}") from None
  except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, absurd nesting
    raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
  return value


def _inside(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def _shard_path(ckpt_dir: str, name, entry: str) -> str:
  """Path of shard `name`, which must stay inside ckpt_dir; `entry` says who named it, for errors.

  Symlinks may point into the Hugging Face hub cache's blob store: a snapshot directory
  `<repo>/snapshots/<revision>/` holds links to `../../blobs/<hash>`.
  """
  if (not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name)
      or ".." in name.replace("\\", "/").split("/")):
    raise CheckpointError(f"{ckpt_dir}: {entry} names shard {name!r}, which is not a relative path "
                          "inside the checkpoint directory")
  path = os.path.join(ckpt_dir, name)
  root = os.path.realpath(ckpt_dir)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.realpath(os.path.join(root, "..", "..", "blobs")))
  real = os.path.realpath(path)
  if not any(_inside(real, r) for r in roots):
    raise CheckpointError(f"{ckpt_dir}: {entry} names shard {name!r}, which resolves to {real}, outside "
                          "the checkpoint directory")
  if not os.path.exists(path):
    raise CheckpointError(f"{ckpt_dir}: shard {name} named by {entry} is missing")
  if not os.path.isfile(path):
    raise CheckpointError(f"{ckpt_dir}: shard {name} named by {entry} is not a regular file")
  return path


class _Reader:
  """Finds tensors across single or sharded safetensors files; dequantises FP8 on access."""

  def __init__(self, ckpt_dir: str):
    index = os.path.join(ckpt_dir, _INDEX)
    if os.path.exists(index):
      weight_map = _load_json(index, "the shard index").get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name → shard file")
      first_entry = {}  # shard → the first weight_map entry naming it, for error messages
      for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
          raise CheckpointError(f"{index}: weight_map entry {tensor!r} maps to {shard!r}, not a file name")
        first_entry.setdefault(shard, f"{_INDEX} weight_map entry {tensor!r}")
      paths = {s: _shard_path(ckpt_dir, s, e) for s, e in sorted(first_entry.items())}
    else:
      files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
      paths = {f: _shard_path(ckpt_dir, f, "the directory listing") for f in files}
    if not paths:
      raise CheckpointError(f"{ckpt_dir}: no *.safetensors files and no {_INDEX}")
    self.files = {name: safetensors_io.SafetensorsFile(path) for name, path in paths.items()}
    self.where = {}
    for shard, f in self.files.items():
      for k in f.keys():
        if k in self.where:  # which copy a loader picks would be an accident of file order
          raise CheckpointError(f"{ckpt_dir}: tensor {k!r} is stored in both {self.where[k]} and {shard}")
        self.where[k] = shard
    self.ckpt_dir = ckpt_dir

  def __contains__(self, name):
    return name in self.where

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise CheckpointError(f"{self.ckpt_dir}: tensor {name!r} is missing from the checkpoint")
    w = self.files[self.where[name]].get(name)
    scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
    if str(w.dtype).startswith("float8"):
      if scale_name not in self.where:
        raise CheckpointError(f"{self.ckpt_dir}: FP8 tensor {name!r} has no {scale_name!r}")
      try:
        return safetensors_io.dequantize_fp8(w, self.files[self.where[scale_name]].get(scale_name))
      except CheckpointError:
        raise
      except ValueError as e:
        raise CheckpointError(f"{self.ckpt_dir}: FP8 tensor {name!r} in {self.where[name]}: {e}") from None
    return np.asarray(w, np.float32)


def read_hf_config(ckpt_dir: str) -> dict:
  """config.json as a dict, with the fields we read type-checked (errors name the file and field)."""
  path = os.path.join(ckpt_dir, "config.json")
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"checkpoint directory {ckpt_dir!r} does not exist")
  if not os.path.exists(path):
    raise CheckpointError(f"{ckpt_dir}: config.json is missing")
  hf = _load_json(path, "config.json")
  try:
    check_hf_field_types(hf)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return hf


def hf_model_config(ckpt_dir: str, dtype=jnp.float32, param_dtype=None, **config_overrides) -> ModelConfig:
  """The ModelConfig `load_hf_checkpoint` builds for this directory, without reading any weight."""
  read_hf_config(ckpt_dir)  # a missing directory or config.json is reported before the weights
  return _model_config(ckpt_dir, _Reader(ckpt_dir), dtype, param_dtype, config_overrides, warn=False)


def _model_config(ckpt_dir, reader, dtype, param_dtype, config_overrides, *, warn: bool) -> ModelConfig:
  overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  cfg = model_config_from_hf(read_hf_config(ckpt_dir), **overrides)
  if cfg.mtp_depth and not any(k.startswith(f"model.layers.{cfg.num_layers}.") for k in reader.where):
    if warn:
      logging.warning("%s declares %d MTP layer(s) but holds no MTP weights; loading without MTP",
                      ckpt_dir, cfg.mtp_depth)
    cfg = cfg.replace(mtp_depth=0)
  return cfg


def load_hf_checkpoint(ckpt_dir: str, dtype=jnp.float32, param_dtype=None, **config_overrides) -> Transformer:
  """Reads a DeepSeek-V2/V3 HF checkpoint directory into a Transformer (compute in `dtype`)."""
  read_hf_config(ckpt_dir)  # a missing directory or config.json is reported before the weights
  reader = _Reader(ckpt_dir)
  cfg = _model_config(ckpt_dir, reader, dtype, param_dtype, config_overrides, warn=True)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  values: dict[Path, np.ndarray] = {}
  for name, path, to_ours, to_hf in _layout(cfg):
    array_path, index = _split_index(path)
    if array_path not in flat:
      raise CheckpointError(f"internal layout error: {array_path} is not a model parameter")
    target = flat[array_path].get_value()
    if array_path not in values:
      values[array_path] = np.zeros(target.shape, np.float32)
    expected = tuple(target.shape[len(index):])
    raw = reader.get(name)
    expected_hf = to_hf(np.empty(expected, np.float32)).shape
    if raw.shape != expected_hf:
      raise CheckpointError(f"{ckpt_dir}: tensor {name!r} has shape {tuple(raw.shape)}, but this config.json "
                            f"implies {tuple(expected_hf)} (our {'/'.join(array_path)} {expected})")
    w = to_ours(raw)
    values[array_path][index] = w
  _warn_unused(reader, {name for name, *_ in _layout(cfg)}, cfg)
  missing = sorted(set(flat) - set(values))
  if missing:
    raise CheckpointError(f"internal layout error: parameters without HF source: {missing}")
  for path, var in flat.items():
    var.set_value(jnp.asarray(values[path], var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _warn_unused(reader: _Reader, used: set[str], cfg: ModelConfig) -> None:
  """Tensors the layout does not read are reported, so nothing is dropped silently."""
  mtp_shared = {f"model.layers.{cfg.num_layers}.{n}" for n in ("embed_tokens.weight", "shared_head.head.weight")}
  empty = lambda k: 0 in reader.files[reader.where[k]].entries[k]["shape"]  # e.g. V2's width-0 shared MLP
  unused = sorted(k for k in reader.where if k not in used and k not in mtp_shared and not empty(k)
                  and not k.endswith(".weight_scale_inv") and not k.startswith(f"model.layers.{cfg.num_layers + 1}."))
  if cfg.mtp_depth == 0:
    unused = [k for k in unused if not k.startswith(f"model.layers.{cfg.num_layers}.")]
  if unused:
    logging.warning("%s: %d checkpoint tensors are not used by this model, e.g. %s", reader.ckpt_dir,
                    len(unused), unused[:5])


def _split_index(path: Path) -> tuple[Path, tuple[int, ...]]:
  names = tuple(p for p in path if not isinstance(p, int))
  return names, tuple(p for p in path if isinstance(p, int))


def save_hf_checkpoint(model: Transformer, out_dir: str, dtype=np.float32) -> None:
  """Writes `model` as a transformers-loadable checkpoint (config.json + model.safetensors)."""
  cfg = model.cfg
  flat = {path: np.asarray(jax.device_get(var.get_value()), np.float32)
          for path, var in nnx.to_flat_state(nnx.state(model))}
  tensors = {}
  for name, path, _, to_hf in _layout(cfg):
    array_path, index = _split_index(path)
    tensors[name] = np.ascontiguousarray(to_hf(flat[array_path][index])).astype(dtype)
  if cfg.mtp_depth:  # the released layout repeats the shared embedding and head inside the MTP layer
    tensors[f"model.layers.{cfg.num_layers}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[f"model.layers.{cfg.num_layers}.shared_head.head.weight"] = tensors["lm_head.weight"]
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(model_config_to_hf(cfg), f, indent=2)
