"""Fuzzing the safetensors reader: a mutated file is read exactly or refused with CheckpointError.

Starting from the committed HF fixtures and from files written by `safetensors_io.write`, each case applies
one seeded random mutation (to header entries, the header text, the length field or the file's bytes),
then opens the file and reads every tensor. Either that succeeds and every array is byte for byte the
slice of the data section that an independent parse of the header names, or it raises CheckpointError
naming the file. Any other exception fails the test with the case's description; the reader before
issue 12 failed it with KeyError, TypeError, AttributeError and numpy reshape errors.
"""

import glob
import json
import os
import random
import struct
import tempfile
import time

from absl.testing import absltest
import ml_dtypes
import numpy as np

from models import safetensors_io
from models.safetensors_io import CheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
SEED = 12
CASES = 1200
# Dtype strings: the valid ones, ones the format defines but we do not read, and plain junk.
DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U64", "U32",
          "U16", "U8", "BOOL", "F8_E8M0", "C64", "f32", "", 4, None, ["F32"]]
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
ODD_VALUES = [-1, 0, 1, 2.0, True, None, "4", [], {}, [[2]], 2**31, 2**63, 2**64, 10**30]


def _split(raw: bytes):
  """(header dict, data bytes) of a valid file."""
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes, text: str | None = None) -> bytes:
  blob = (json.dumps(header) if text is None else text).encode()
  return struct.pack("<Q", len(blob)) + blob + data


def _written_bases() -> dict[str, bytes]:
  """Small files from our writer: every dtype, zero-size and 0-d tensors, metadata, and no tensors."""
  rng = np.random.default_rng(SEED)
  mixed = {f"t_{name}": (rng.standard_normal(6) * 3).astype(dtype).reshape(3, 2)
           for name, dtype in [("f32", np.float32), ("bf16", ml_dtypes.bfloat16), ("f8", ml_dtypes.float8_e4m3fn),
                               ("i64", np.int64), ("u16", np.uint16), ("bool", np.bool_), ("f16", np.float16)]}
  mixed.update(empty=np.zeros((0, 5), np.float32), scalar=np.array(3, np.int32))
  bases = {}
  with tempfile.TemporaryDirectory() as tmp:
    single = {"w": np.ones((4, 4), np.float32)}
    for name, tensors, meta in [("mixed", mixed, {"format": "pt"}), ("single", single, None), ("none", {}, None)]:
      path = os.path.join(tmp, name)
      safetensors_io.write(path, tensors, meta)
      with open(path, "rb") as f:
        bases[f"written:{name}"] = f.read()
  return bases


def _fixture_bases() -> dict[str, bytes]:
  paths = sorted(glob.glob(os.path.join(FIXTURES, "*.safetensors")))
  paths.append(os.path.join(FIXTURES, "v3_fp8", "model-00001-of-00003.safetensors"))  # FP8 + scales
  bases = {}
  for path in paths:
    with open(path, "rb") as f:
      bases["fixture:" + os.path.relpath(path, FIXTURES)] = f.read()
  return bases


# Mutations: (rng, header, data, raw) → (description, new file bytes). `header` is a fresh copy.

def _tensor(rng, header):
  names = [k for k in header if k != "__metadata__"]
  return rng.choice(names) if names else None


def _entry_mutation(change):
  def mutate(rng, header, data, raw):
    name = _tensor(rng, header)
    if name is None:
      header["x"] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}
      name = "x"
    desc = change(rng, header, name, len(data))
    return f"{name!r}: {desc}", _join(header, data)
  return mutate


def _offsets_random(rng, header, name, n):
  picks = [0, 1, n - 1, n, n + 1, n + 8, 2**63, 2**64, -1] + [rng.randrange(max(n, 1) + 16) for _ in range(4)]
  header[name]["data_offsets"] = [rng.choice(picks), rng.choice(picks)]
  return f"data_offsets := {header[name]['data_offsets']}"


def _offsets_shift(rng, header, name, n):
  k = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
  header[name]["data_offsets"] = [o + k for o in header[name]["data_offsets"]]
  return f"data_offsets shifted by {k}"


def _offsets_swap(rng, header, name, n):
  header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
  return "data_offsets reversed"


def _offsets_copy(rng, header, name, n):
  other = _tensor(rng, header)
  header[name]["data_offsets"] = list(header[other]["data_offsets"])
  return f"data_offsets copied from {other!r} (overlap)"


def _offsets_odd(rng, header, name, n):
  header[name]["data_offsets"] = rng.choice(
      [[0], [0, 4, 8], "0,4", [0.0, 4.0], [True, False], None, {}, ["0", "4"], [0, None]])
  return f"data_offsets := {header[name]['data_offsets']!r}"


def _dtype(rng, header, name, n):
  header[name]["dtype"] = rng.choice(DTYPES)
  return f"dtype := {header[name]['dtype']!r}"


def _shape(rng, header, name, n):
  shape = list(header[name]["shape"])
  choice = rng.randrange(6)
  if choice == 0:
    shape = [rng.randrange(12) for _ in range(rng.randrange(5))]
  elif choice == 1 and shape:
    shape[rng.randrange(len(shape))] = rng.choice(ODD_VALUES)
  elif choice == 2:
    shape = rng.choice([[1] * 70 + shape, "2", None, [[2, 2]], [0, 2**62, 2**62], [2**64], shape[::-1]])
  elif choice == 3:
    shape = shape + [1] if rng.random() < 0.5 else shape[:-1]
  elif choice == 4 and len(shape) >= 2 and shape[0] % 2 == 0:
    shape = [shape[0] // 2, shape[1] * 2] + shape[2:]  # same size: still a valid layout
  else:
    shape = [d + rng.choice([-1, 1]) for d in shape]
  header[name]["shape"] = shape
  return f"shape := {shape!r:.80}"


def _drop_field(rng, header, name, n):
  field = rng.choice(["dtype", "shape", "data_offsets"])
  del header[name][field]
  return f"{field} removed"


def _entry_type(rng, header, name, n):
  header[name] = rng.choice([[], 1, "F32", None, [header[name]]])
  return f"entry := {header[name]!r:.60}"


def _remove(rng, header, name, n):
  del header[name]
  return "entry removed"


def _add(rng, header, name, n):
  dtype = rng.choice(DTYPES[:15])
  count = rng.randrange(4)
  begin = rng.choice([0, n, rng.randrange(n + 1)])
  header["added"] = {"dtype": dtype, "shape": [count], "data_offsets": [begin, begin + count * ITEMSIZE[dtype]]}
  return f"added entry {header['added']}"


def _metadata(rng, header, data, raw):
  header["__metadata__"] = rng.choice([[], 1, "pt", None, {"format": 1}, {"format": "pt"}, {"a": None}])
  return f"__metadata__ := {header['__metadata__']!r}", _join(header, data)


def _top_level(rng, header, data, raw):
  value = rng.choice([[], "x", 1, None, True, [header]])
  return f"header := {value!r:.40}", _join(value, data)


def _duplicate_key(rng, header, data, raw):
  items = list(header.items())
  if not items:
    items = [("x", {})]
  k, v = rng.choice(items)
  other = rng.choice(items)[1]
  items.insert(rng.randrange(len(items) + 1), (k, rng.choice([v, other])))
  text = "{" + ", ".join(f"{json.dumps(a)}: {json.dumps(b)}" for a, b in items) + "}"
  return f"duplicate key {k!r}", _join(None, data, text)


def _relayout(rng, header, data, raw):
  """A valid file in another order: permute the tensors' places in the data section."""
  names = [k for k in header if k != "__metadata__"]
  rng.shuffle(names)
  pos, pieces = 0, []
  for k in names:
    b, e = header[k]["data_offsets"]
    pieces.append(data[b:e])
    header[k]["data_offsets"] = [pos, pos + e - b]
    pos += e - b
  return "tensors relaid out in a shuffled order (valid)", _join(header, b"".join(pieces))


def _data_bytes(rng, header, data, raw):
  out = bytearray(raw)
  hl = struct.unpack("<Q", raw[:8])[0]
  if len(raw) == 8 + hl:
    return "no data bytes to flip (valid)", raw
  for _ in range(rng.randrange(1, 9)):
    out[rng.randrange(8 + hl, len(raw))] = rng.randrange(256)
  return "data bytes overwritten (valid)", bytes(out)


def _header_len(rng, header, data, raw):
  hl, size = struct.unpack("<Q", raw[:8])[0], len(raw)
  value = rng.choice([0, 1, 2, hl - 1, hl + 1, hl - 8, hl + 8, size - 8, size - 7, size, 2**32, 2**63,
                      2**64 - 1, rng.randrange(2**64)])
  value %= 2**64
  return f"header length := {value}", struct.pack("<Q", value) + raw[8:]


def _truncate(rng, header, data, raw):
  cut = rng.randrange(len(raw))
  return f"truncated to {cut} of {len(raw)} bytes", raw[:cut]


def _append(rng, header, data, raw):
  junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
  return f"{len(junk)} bytes appended", raw + junk


def _header_junk(rng, header, data, raw):
  hl = struct.unpack("<Q", raw[:8])[0]
  out = bytearray(raw)
  spots = []
  for _ in range(rng.randrange(1, 9)):
    i = 8 + rng.randrange(hl)
    out[i] = rng.choice([rng.randrange(256), *b'{}[]":,0123456789-. \\', 0x80, 0xff])
    spots.append(i)
  return f"header bytes at {spots} overwritten", bytes(out)


def _header_digit(rng, header, data, raw):
  """Changes one digit of the header text: subtly wrong offsets and shapes."""
  hl = struct.unpack("<Q", raw[:8])[0]
  digits = [i for i in range(8, 8 + hl) if 0x30 <= raw[i] <= 0x39]
  if not digits:
    return "no digit to change", raw
  i = rng.choice(digits)
  return f"header digit at {i} := {chr(raw[i])}→?", raw[:i] + bytes([rng.choice(b"0123456789")]) + raw[i + 1:]


def _header_text(rng, header, data, raw):
  """Replaces the header with hostile JSON text (length field kept consistent)."""
  text = rng.choice([
      "[" * 50_000 + "]" * 50_000,
      json.dumps(header).replace("[", "[NaN, ", 1),
      json.dumps(header).replace("]", ", 1e400]", 1),
      json.dumps(header).replace("[", "[" + "9" * 5000 + ", ", 1),
      json.dumps(header)[:-1],
      json.dumps(header) + " " * rng.randrange(1, 9),  # padding is valid
      "",
  ])
  return f"header text := {text[:40]!r}…", _join(None, data, text)


def _header_encoding(rng, header, data, raw):
  blob = json.dumps(header).encode(rng.choice(["utf-16", "utf-32", "utf-8-sig"]))
  return "header re-encoded", struct.pack("<Q", len(blob)) + blob + data


MUTATIONS = {
    "offsets_random": _entry_mutation(_offsets_random), "offsets_shift": _entry_mutation(_offsets_shift),
    "offsets_swap": _entry_mutation(_offsets_swap), "offsets_copy": _entry_mutation(_offsets_copy),
    "offsets_odd": _entry_mutation(_offsets_odd), "dtype": _entry_mutation(_dtype),
    "shape": _entry_mutation(_shape), "drop_field": _entry_mutation(_drop_field),
    "entry_type": _entry_mutation(_entry_type), "remove": _entry_mutation(_remove), "add": _entry_mutation(_add),
    "metadata": _metadata, "top_level": _top_level, "duplicate_key": _duplicate_key, "relayout": _relayout,
    "data_bytes": _data_bytes, "header_len": _header_len, "truncate": _truncate, "append": _append,
    "header_junk": _header_junk, "header_digit": _header_digit, "header_text": _header_text,
    "header_encoding": _header_encoding,
}


class SafetensorsFuzzTest(absltest.TestCase):

  def _check(self, path: str, raw: bytes) -> str | None:
    """'read' or 'refused'; raises AssertionError (via the caller's bookkeeping) on anything else."""
    try:
      f = safetensors_io.SafetensorsFile(path)
      arrays = {name: f.get(name) for name in f.keys()}
    except CheckpointError as e:
      if path not in str(e):
        raise AssertionError(f"CheckpointError does not name the file: {e}") from None
      return "refused"
    # Accepted: an independent parse says where each tensor lies; the array must be exactly those bytes.
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    if set(arrays) != set(header):
      raise AssertionError(f"tensors {sorted(arrays)} != header {sorted(header)}")
    for name, info in header.items():
      begin, end = info["data_offsets"]
      if not 0 <= begin <= end <= len(data):
        raise AssertionError(f"{name!r}: accepted data_offsets {info['data_offsets']} outside {len(data)} bytes")
      arr = arrays[name]
      if arr.shape != tuple(info["shape"]) or arr.dtype.itemsize != ITEMSIZE[info["dtype"]]:
        raise AssertionError(f"{name!r}: got {arr.dtype}{arr.shape}, header says {info}")
      if arr.tobytes() != data[begin:end]:
        raise AssertionError(f"{name!r}: bytes differ from the data section's [{begin}, {end})")
    return "read"

  def test_mutated_files_are_read_exactly_or_refused(self):
    rng = random.Random(SEED)
    bases = {**_fixture_bases(), **_written_bases()}
    self.assertGreaterEqual(len(bases), 10)
    counts = {"read": 0, "refused": 0}
    kinds = {}
    failures = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      for case in range(CASES):
        base = rng.choice(sorted(bases))
        kind = rng.choice(sorted(MUTATIONS))
        header, data = _split(bases[base])
        desc, raw = MUTATIONS[kind](rng, header, data, bases[base])
        desc = f"case {case} ({base}, {kind}): {desc}"
        path = os.path.join(tmp, f"case{case}.safetensors")
        with open(path, "wb") as f:
          f.write(raw)
        try:
          outcome = self._check(path, raw)
        except BaseException as e:  # pylint: disable=broad-except
          failures.append(f"{desc}: {type(e).__name__}: {str(e)[:300]}")
          continue
        finally:
          os.remove(path)
        counts[outcome] += 1
        kinds.setdefault(kind, set()).add(outcome)
    elapsed = time.perf_counter() - start
    self.assertEqual(failures, [], f"{len(failures)} of {CASES} mutated files escaped:\n" + "\n".join(failures[:20]))
    # The fuzzing is not vacuous: every mutation ran, and both outcomes occur often.
    self.assertEqual(set(kinds), set(MUTATIONS))
    self.assertGreater(counts["refused"], CASES // 2, counts)
    self.assertGreater(counts["read"], CASES // 20, counts)
    self.assertEqual(kinds["relayout"], {"read"})  # valid rewrites are accepted, not refused
    self.assertLess(elapsed, 30, f"{CASES} cases took {elapsed:.1f}s")


if __name__ == "__main__":
  absltest.main()
