"""Minimal, dependency-light safetensors reading/writing with bf16 and FP8 support.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then the raw bytes. Reading memory-maps the file, so a sharded
checkpoint is never loaded whole. FP8 weights come with `weight_scale_inv` block scales.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy read access to one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{path}: not a safetensors file (truncated header)")
      (header_len,) = struct.unpack("<Q", raw)
      try:
        header = json.loads(f.read(header_len))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    self.entries = header
    self._data_start = 8 + header_len
    self._mmap = None

  def keys(self):
    return self.entries.keys()

  def get(self, name: str) -> np.ndarray:
    info = self.entries[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = info["data_offsets"]
    raw = self._mmap[self._data_start + start:self._data_start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def read(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file, copied into memory (the counterpart of `write`)."""
  f = SafetensorsFile(path)
  return {name: np.array(f.get(name)) for name in f.keys()}


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays (float32/bf16/int…) as one safetensors file, atomically."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in _NAMES:
      raise ValueError(f"cannot write {name}: dtype {arr.dtype} has no safetensors name")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
  os.replace(tmp, path)


def dequantize_fp8(w_fp8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
  """DeepSeek's FP8 layout: weight [out, in] in e4m3 times one float32 scale per block×block tile."""
  out_dim, in_dim = w_fp8.shape
  expected = (math.ceil(out_dim / block[0]), math.ceil(in_dim / block[1]))
  if tuple(scale_inv.shape) != expected:
    raise ValueError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {w_fp8.shape} "
                     f"in {block} blocks (expected {expected})")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
  return w_fp8.astype(np.float32) * scale[:out_dim, :in_dim]
