"""Minimal, dependency-light safetensors reading/writing with bf16 and FP8 support.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then the raw bytes. Reading memory-maps the file, so a sharded
checkpoint is never loaded whole. FP8 weights come with `weight_scale_inv` block scales.

Files are untrusted input (downloaded checkpoints): the whole header is checked when a file is opened,
before any tensor is touched, so every later read is a slice that provably lies inside the file.
Every problem is a `CheckpointError` naming the file and, where there is one, the tensor.
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
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# Real headers are at most a few MB (the safetensors library itself refuses 100 MB); the cap bounds what
# a forged length field can make us read and parse.
MAX_HEADER_BYTES = 100 * 2**20
# numpy 1.x arrays have at most 32 dimensions (numpy 2: 64); no checkpoint comes close.
_MAX_NDIM = 32
# numpy refuses shapes whose non-zero dims multiply past its signed 64-bit size type.
_MAX_NUMPY_BYTES = 2**63 - 1


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read as the expected layout."""


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false arrive as Python bools


def _no_duplicate_keys(pairs):
  # json.loads keeps the last of repeated keys; two entries for one tensor name are ambiguous.
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r}")
    out[key] = value
  return out


def _parse_header(path: str, raw: bytes):
  try:
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
  except (ValueError, RecursionError) as e:  # JSON, UTF-8, over-long integer literal, deep nesting
    raise CheckpointError(f"{path}: corrupt safetensors header: {type(e).__name__}: {e}") from None


def _check_entry(path: str, name: str, info, data_len: int) -> tuple[int, int]:
  """Validates one header entry; returns its (begin, end) offsets into the data section."""
  def bad(msg):
    return CheckpointError(f"{path}: tensor {name!r}: {msg}")

  if not isinstance(info, dict):
    raise bad(f"header entry must be an object, got {type(info).__name__}")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
  if missing:
    raise bad(f"header entry lacks {missing}")
  dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(dtype, str) or dtype not in _DTYPES:
    raise bad(f"unsupported dtype {dtype!r} (supported: {sorted(_DTYPES)})")
  if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
    raise bad(f"shape must be a list of non-negative integers, got {shape!r:.200}")
  if len(shape) > _MAX_NDIM:
    raise bad(f"shape has {len(shape)} dimensions, more than {_MAX_NDIM}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
    raise bad(f"data_offsets must be two non-negative integers, got {offsets!r:.200}")
  begin, end = offsets
  if begin > end:
    raise bad(f"data_offsets {offsets} begin after they end")
  if end > data_len:
    raise bad(f"data_offsets {offsets} end past the data section ({data_len} bytes; truncated file?)")
  itemsize, nbytes = np.dtype(_DTYPES[dtype]).itemsize, end - begin
  # Multiply with early exit: the dims are bounded only by the header, their product by nothing.
  size = 1
  for d in shape:
    size *= d or 1
    if size * itemsize > _MAX_NUMPY_BYTES:
      raise bad(f"shape {shape!r:.200} is too large for numpy")
  if 0 in shape:
    size = 0
  if size * itemsize != nbytes:
    raise bad(f"{dtype} {shape} needs {size * itemsize} bytes, but data_offsets {offsets} span {nbytes}")
  return begin, end


class SafetensorsFile:
  """Lazy read access to one .safetensors file whose header has been fully validated."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      file_size = os.fstat(f.fileno()).st_size
      raw = f.read(8)
      if len(raw) != 8:
        raise CheckpointError(f"{path}: not a safetensors file ({file_size} bytes, shorter than the "
                              "8-byte header length)")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > min(file_size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"{path}: header length {header_len} exceeds the file's {file_size - 8} bytes "
                              f"after the length field or the {MAX_HEADER_BYTES}-byte limit")
      raw = f.read(header_len)
    if len(raw) != header_len:
      raise CheckpointError(f"{path}: file shrank while its header was read")
    header = _parse_header(path, raw)
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
      raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    data_len = file_size - 8 - header_len
    ranges = sorted((_check_entry(path, name, info, data_len), name) for name, info in header.items())
    # The format requires the tensors to tile the data section: no overlap, no gap, no trailing bytes.
    pos, prev = 0, None
    for (begin, end), name in ranges:
      if begin != pos:
        before = "the data section starts" if prev is None else f"tensor {prev!r} ends"
        raise CheckpointError(f"{path}: tensor {name!r} starts at data offset {begin}, but {before} at {pos} "
                              f"({'overlapping' if begin < pos else 'a gap'}; tensors must tile the data)")
      pos, prev = end, name
    if pos != data_len:
      last = f"after tensor {prev!r}" if prev else "and no tensor covers them"
      raise CheckpointError(f"{path}: data section is {data_len} bytes, but the tensors cover {pos} "
                            f"({data_len - pos} unaccounted bytes {last})")
    self.entries = header
    self.metadata = metadata or {}
    self._data_start = 8 + header_len
    self._file_size = file_size
    self._mmap = None

  def keys(self):
    return self.entries.keys()

  def get(self, name: str) -> np.ndarray:
    """A read-only view of tensor `name` into the memory-mapped file (no copy)."""
    if name not in self.entries:
      raise CheckpointError(f"{self.path}: no tensor {name!r} in this file")
    info = self.entries[name]
    if self._mmap is None:
      mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
      if len(mmap) != self._file_size:  # the offsets were checked against the size seen at open
        raise CheckpointError(f"{self.path}: file changed size since it was opened "
                              f"({self._file_size} → {len(mmap)} bytes)")
      self._mmap = mmap
    begin, end = info["data_offsets"]
    raw = self._mmap[self._data_start + begin:self._data_start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def read(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file, copied into memory (the counterpart of `write`)."""
  f = SafetensorsFile(path)
  return {name: np.array(f.get(name)) for name in f.keys()}


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays (float32/bf16/int…) as one safetensors file, atomically."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])  # not ascontiguousarray, which turns 0-d into [1]; tobytes is C order
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
  if w_fp8.ndim != 2:
    raise ValueError(f"FP8 weight must be 2-D [out, in], got shape {w_fp8.shape}")
  out_dim, in_dim = w_fp8.shape
  expected = (math.ceil(out_dim / block[0]), math.ceil(in_dim / block[1]))
  if tuple(scale_inv.shape) != expected:
    raise ValueError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {w_fp8.shape} "
                     f"in {block} blocks (expected {expected})")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
  return w_fp8.astype(np.float32) * scale[:out_dim, :in_dim]
