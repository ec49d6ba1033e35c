"""Hugging Face checkpoints: safetensors files, the shard index, config.json (models/hf*.py)."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shutil
import struct
from typing import Callable

import numpy as np

import models
from models import safetensors_io

from tools.bad_input_survey.harness import ENV, HF_FIXTURE, NAN, Case, Mishandled

SHARD1 = "model-00001-of-00003.safetensors"
INDEX = "model.safetensors.index.json"


def _hf_copy() -> pathlib.Path:
  ckpt = ENV.new_dir("hf") / "ckpt"
  shutil.copytree(HF_FIXTURE, ckpt)
  return ckpt


def _split_safetensors(path: pathlib.Path) -> tuple[dict, bytes]:
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: pathlib.Path, header, data: bytes, *, header_bytes: bytes | None = None):
  blob = json.dumps(header).encode() if header_bytes is None else header_bytes
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _hf_load(mutate: Callable[[pathlib.Path], None]):
  """Loads a copy of the tiny V3 fixture after `mutate(checkpoint_dir)`."""
  def run():
    ckpt = _hf_copy()
    mutate(ckpt)
    models.load_hf_checkpoint(str(ckpt))
    return "loaded"
  return run


def _header_edit(edit: Callable[[dict], None]):
  def mutate(ckpt):
    header, data = _split_safetensors(ckpt / SHARD1)
    edit(header)
    _write_safetensors(ckpt / SHARD1, header, data)
  return mutate


def _first_tensor(header: dict) -> dict:
  return header[min(k for k in header if k != "__metadata__")]


def _set_offsets(header: dict, offsets):
  _first_tensor(header)["data_offsets"] = offsets


def _overlap(header: dict):
  names = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
  second = header[names[1][1]]
  begin, end = second["data_offsets"]
  second["data_offsets"] = [begin - 4, end - 4]  # now overlaps the first; a gap of 4 at its end


def _truncate(ckpt):
  path = ckpt / SHARD1
  path.write_bytes(path.read_bytes()[:-100])


def _raw_header(blob: bytes):
  def mutate(ckpt):
    _, data = _split_safetensors(ckpt / SHARD1)
    _write_safetensors(ckpt / SHARD1, None, data, header_bytes=blob)
  return mutate


def _huge_header_length(ckpt):
  path = ckpt / SHARD1
  path.write_bytes(struct.pack("<Q", 2**40) + path.read_bytes()[8:])


def _index_edit(edit: Callable[[dict], None]):
  def mutate(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    edit(index)
    (ckpt / INDEX).write_text(json.dumps(index))
  return mutate


def _point_shard1_at(name: str):
  def edit(index):
    index["weight_map"] = {k: name if v == SHARD1 else v for k, v in index["weight_map"].items()}
  return edit


def _config_edit(**changes):
  def mutate(ckpt):
    hf = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
      if value is _DELETE:
        del hf[key]
      else:
        hf[key] = value
    (ckpt / "config.json").write_text(json.dumps(hf))
  return mutate


_DELETE = object()


def _rewrite_tensor(name: str, value: np.ndarray | None):
  """Rewrites the shard holding `name` with that tensor replaced (None: removed, index updated)."""
  def mutate(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = safetensors_io.read(str(shard))
    if value is None:
      del tensors[name]
      del index["weight_map"][name]
      (ckpt / INDEX).write_text(json.dumps(index))
    else:
      tensors[name] = value
    safetensors_io.write(str(shard), tensors)
  return mutate


def _write(relpath: str, text: str):
  return lambda ckpt: (ckpt / relpath).write_text(text)


def _hf_null_means_default():
  """models/hf_config.py: a null field other than q_lora_rank stands for transformers' class default."""
  ckpt = _hf_copy()
  _config_edit(num_experts_per_tok=None)(ckpt)
  with contextlib.redirect_stdout(io.StringIO()):
    k = models.load_hf_checkpoint(str(ckpt)).cfg.num_experts_per_tok
  if k != 8:
    raise Mishandled(f"num_experts_per_tok became {k}, not the DeepseekV3Config default 8")
  return "loads with num_experts_per_tok 8, DeepseekV3Config's default"


def hf_cases() -> list[Case]:
  err = (models.CheckpointError, ValueError)

  def case(name, mutate, *says):
    return Case("HF checkpoint", name, _hf_load(mutate), err, says)

  return [
      case("safetensors file truncated", _truncate, SHARD1, "truncated"),
      case("safetensors file of 4 bytes", lambda c: (c / SHARD1).write_bytes(b"\x10\0\0\0"), SHARD1),
      case("safetensors header length 2**40", _huge_header_length, SHARD1, "header length"),
      case("safetensors header not JSON", _raw_header(b"{not json" + b" " * 7), SHARD1, "header"),
      case("safetensors header a JSON list", _raw_header(b"[1, 2, 3]"), SHARD1, "JSON object"),
      case("safetensors negative data_offsets", _header_edit(lambda h: _set_offsets(h, [-8, 0])), SHARD1,
           "data_offsets"),
      case("safetensors offsets end before they begin", _header_edit(lambda h: _set_offsets(h, [8, 0])),
           SHARD1, "data_offsets"),
      case("safetensors overlapping tensors", _header_edit(_overlap), SHARD1, "overlapping"),
      case("safetensors unknown dtype 'F7'", _header_edit(lambda h: _first_tensor(h).update(dtype="F7")),
           SHARD1, "'F7'"),
      case("safetensors shape that does not match the bytes",
           _header_edit(lambda h: _first_tensor(h).update(shape=[3, 3])), SHARD1, "[3, 3]"),
      case("index weight_map entry '../outside.safetensors'", _index_edit(_point_shard1_at("../outside.safetensors")),
           "../outside.safetensors", "weight_map"),
      case("index weight_map entry an absolute path", _index_edit(_point_shard1_at("/etc/passwd")),
           "/etc/passwd", "weight_map"),
      case("index weight_map names a missing shard", _index_edit(_point_shard1_at("model-9.safetensors")),
           "model-9.safetensors", "missing"),
      case("index not JSON", _write(INDEX, '{"weight_map": {'), INDEX, "JSON"),
      case("index without weight_map", _write(INDEX, '{"metadata": {}}'), INDEX, "weight_map"),
      case("config.json not JSON", _write("config.json", '{"model_type": "deepseek_v3",'), "config.json", "JSON"),
      case("config.json missing", lambda c: (c / "config.json").unlink(), "config.json"),
      case("config.json hidden_size \"48\" (a string)", _config_edit(hidden_size="48"), "config.json",
           "hidden_size", "'48'"),
      case("config.json hidden_size null", _config_edit(hidden_size=None), "hidden_size"),
      case("config.json num_hidden_layers -1", _config_edit(num_hidden_layers=-1), "num_hidden_layers"),
      case("config.json attention_bias \"false\" (a string)", _config_edit(attention_bias="false"),
           "attention_bias"),
      case("config.json rms_norm_eps NaN", _config_edit(rms_norm_eps=NAN), "rms_norm_eps"),
      case("config.json vocab_size null", _config_edit(vocab_size=None), "vocab_size"),
      Case("HF checkpoint", "config.json num_experts_per_tok null (the documented default)",
           _hf_null_means_default, None),
      case("config.json without model_type", _config_edit(model_type=_DELETE), "model_type"),
      case("config.json model_type 'llama' (unsupported)", _config_edit(model_type="llama"), "model_type",
           "llama"),
      case("config.json rope type 'linear'",
           _config_edit(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), "rope", "linear"),
      case("config.json hidden_act 'gelu'", _config_edit(hidden_act="gelu"), "hidden_act", "gelu"),
      case("config.json num_experts_per_tok 40 > 16 experts", _config_edit(num_experts_per_tok=40),
           "num_experts_per_tok", "40"),
      case("tensor missing from the checkpoint", _rewrite_tensor("lm_head.weight", None), "lm_head.weight"),
      case("tensor with the wrong shape", _rewrite_tensor("lm_head.weight", np.zeros((96, 48), np.float32)),
           "lm_head.weight", "(96, 48)"),
      case("checkpoint directory that does not exist", lambda c: shutil.rmtree(c), "ckpt"),
      case("checkpoint directory without any safetensors",
           lambda c: [p.unlink() for p in c.iterdir() if "safetensors" in p.name], "safetensors"),
  ]
