"""safetensors_io treats files as untrusted: one test per header rule, each naming file and tensor.

Every rule test below failed on the reader before issue 12: it opened such files without complaint (and
failed, if at all, at the first `get` with a numpy or KeyError message), or raised a plain ValueError,
KeyError or AttributeError instead of `CheckpointError`.
"""

import json
import os
import re
import struct
import tempfile

from absl.testing import absltest, parameterized
import ml_dtypes
import numpy as np

import models
from models import safetensors_io
from models.safetensors_io import CheckpointError

# Two tensors tiling a 19-byte data section: 'a' F32 [2, 2] at [0, 16), 'b' I8 [3] at [16, 19).
DATA = np.arange(4, dtype=np.float32).tobytes() + bytes([1, 2, 3])


def _header():
  return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
          "b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}}


def _set(**changes):
  return lambda entry: {**entry, **changes}


def _raw(header, data=DATA, header_len=None):
  """File bytes for a header (dict, or raw bytes as written) and a data section."""
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data


class SafetensorsIoTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.path = os.path.join(tmp.name, "weights.safetensors")

  def _write(self, raw: bytes) -> str:
    with open(self.path, "wb") as f:
      f.write(raw)
    return self.path

  def _assert_rejected(self, raw: bytes, pattern: str, tensor: str | None = None):
    """Opening alone (no `get`) must raise CheckpointError naming the file, the tensor and the problem."""
    with self.assertRaises(CheckpointError) as ctx:
      safetensors_io.SafetensorsFile(self._write(raw))
    msg = str(ctx.exception)
    self.assertIn(self.path, msg)
    if tensor is not None:
      self.assertIn(repr(tensor), msg)
    self.assertRegex(msg, pattern)

  # The valid baseline, and the error class shared with models.hf.

  def test_valid_file_reads_lazily_as_views(self):
    f = safetensors_io.SafetensorsFile(self._write(_raw(_header())))
    a, b = f.get("a"), f.get("b")
    np.testing.assert_array_equal(a, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(b, [1, 2, 3])
    self.assertIsInstance(a, np.memmap)  # still a view of the mapped file, not a copy
    self.assertFalse(a.flags.writeable)

  def test_checkpoint_error_is_one_class(self):
    self.assertIs(models.CheckpointError, CheckpointError)
    self.assertTrue(issubclass(CheckpointError, ValueError))

  def test_round_trip_of_every_dtype_with_empty_and_scalar_tensors(self):
    """Zero-size and 0-d tensors tile the data section too. (Old code could not write U16/U32/U64.)"""
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(6) * 5).astype(dtype).reshape(2, 3)
               for name, dtype in safetensors_io._DTYPES.items()}
    tensors["empty"] = np.zeros((0, 16), np.float32)
    tensors["scalar"] = np.array(7, np.int64)
    safetensors_io.write(self.path, tensors, {"format": "pt"})
    got = safetensors_io.read(self.path)
    self.assertEqual(set(got), set(tensors))
    for name, want in tensors.items():
      self.assertEqual((got[name].dtype, got[name].shape), (want.dtype, want.shape), name)
      self.assertEqual(got[name].tobytes(), want.tobytes(), name)
    self.assertEqual(safetensors_io.SafetensorsFile(self.path).metadata, {"format": "pt"})

  # Header length.

  @parameterized.named_parameters(
      ("one_past_file", lambda n: n + 1), ("u64_max", lambda n: 2**64 - 1), ("huge", lambda n: 2**40))
  def test_header_length_beyond_file(self, length):
    raw = _raw(_header())
    self._assert_rejected(_raw(_header(), header_len=length(len(raw) - 8)), r"header length \d+ exceeds")

  def test_header_length_cap(self):
    """A length field within the file but above the cap is refused before anything is read."""
    with open(self.path, "wb") as f:  # sparse: costs no disk space
      f.write(struct.pack("<Q", safetensors_io.MAX_HEADER_BYTES + 1) + b"{")
      f.truncate(safetensors_io.MAX_HEADER_BYTES + 64)
    with self.assertRaisesRegex(CheckpointError, re.escape(self.path) + r".*-byte limit"):
      safetensors_io.SafetensorsFile(self.path)

  def test_file_shorter_than_length_field(self):
    self._assert_rejected(b"\x10\x00\x00", r"shorter than the 8-byte header length")

  # The header is a JSON object of well-formed entries.

  @parameterized.named_parameters(
      ("junk", b"{not json"),
      ("invalid_utf8", b'{"a\xff": 1}'),
      ("utf16", json.dumps(_header()).encode("utf-16")),  # json.loads(bytes) would accept this
      ("deep_nesting", b"[" * 100_000 + b"]" * 100_000),
      ("huge_int_literal", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'),
  )
  def test_header_is_not_json(self, blob):
    self._assert_rejected(_raw(blob), r"corrupt safetensors header")

  @parameterized.named_parameters(("list", []), ("string", "x"), ("number", 3), ("null", None))
  def test_header_is_not_an_object(self, header):
    self._assert_rejected(_raw(header, b""), r"must be a JSON object")

  def test_metadata_must_map_to_strings(self):
    self._assert_rejected(_raw({**_header(), "__metadata__": {"format": 1}}), r"__metadata__")

  def test_duplicate_tensor_names(self):
    entry_a = json.dumps(_header()["a"])
    blob = f'{{"a": {entry_a}, "b": {json.dumps(_header()["b"])}, "a": {entry_a}}}'.encode()
    self._assert_rejected(_raw(blob), r"duplicate key 'a'")

  @parameterized.named_parameters(
      ("not_an_object", lambda e: [1, 2], r"must be an object"),
      ("missing_dtype", lambda e: {k: v for k, v in e.items() if k != "dtype"}, r"lacks \['dtype'\]"),
      ("unknown_dtype", _set(dtype="F8_E8M0"), r"unsupported dtype 'F8_E8M0'"),
      ("lowercase_dtype", _set(dtype="f32"), r"unsupported dtype"),
      ("dtype_not_string", _set(dtype=4), r"unsupported dtype"),
      ("shape_not_list", _set(shape="2,2"), r"shape must be a list"),
      ("negative_dim", _set(shape=[-2, -2]), r"shape must be a list of non-negative"),
      ("float_dim", _set(shape=[2.0, 2]), r"shape must be a list"),
      ("bool_dim", _set(shape=[True, 4]), r"shape must be a list"),
      ("too_many_dims", _set(shape=[1] * 40 + [4]), r"41 dimensions"),
      ("dims_overflow_numpy", _set(shape=[0, 2**62, 2**62]), r"too large"),
      ("three_offsets", _set(data_offsets=[0, 8, 16]), r"data_offsets must be two"),
      ("negative_offset", _set(data_offsets=[-16, 0]), r"data_offsets must be two non-negative"),
      ("bool_offsets", _set(data_offsets=[False, 16]), r"data_offsets must be two"),
      ("begin_after_end", _set(data_offsets=[16, 0]), r"begin after they end"),
      ("size_mismatch", _set(shape=[2, 3]), r"F32 \[2, 3\] needs 24 bytes, but data_offsets \[0, 16\] span 16"),
      ("dtype_size_mismatch", _set(dtype="F64"), r"needs 32 bytes"),
      ("past_data_section", _set(data_offsets=[0, 20], shape=[5]), r"end past the data section \(19 bytes"),
  )
  def test_bad_entry_is_rejected_at_open(self, change, pattern):
    header = _header()
    header["a"] = change(header["a"])
    self._assert_rejected(_raw(header), pattern, tensor="a")

  # The tensors tile the data section exactly.

  def test_overlapping_tensors(self):
    header = _header()
    header["b"]["data_offsets"] = [15, 18]
    self._assert_rejected(_raw(header), r"starts at data offset 15, but tensor 'a' ends at 16 \(overlapping",
                          tensor="b")

  def test_gap_between_tensors(self):
    header = _header()
    header["b"] = {"dtype": "I8", "shape": [2], "data_offsets": [17, 19]}
    self._assert_rejected(_raw(header), r"starts at data offset 17, but tensor 'a' ends at 16 \(a gap", tensor="b")

  def test_gap_before_first_tensor(self):
    header = {"b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]}}
    self._assert_rejected(_raw(header), r"offset 16, but the data section starts at 0", tensor="b")

  def test_trailing_bytes_after_last_tensor(self):
    self._assert_rejected(_raw(_header(), DATA + b"\0" * 5), r"5 unaccounted bytes after tensor 'b'")

  def test_data_without_tensors(self):
    self._assert_rejected(_raw({}, b"\0" * 8), r"8 unaccounted bytes and no tensor covers them")

  # Truncation.

  def test_truncated_file_names_file_and_tensor(self):
    """Old code opened this and then failed in numpy: 'cannot reshape array of size 0 …'."""
    safetensors_io.write(self.path, {"x": np.ones((4, 4), np.float32), "y": np.ones(8, np.float32)})
    with open(self.path, "rb") as f:
      raw = f.read()
    self._assert_rejected(raw[:-5], r"'y': data_offsets \[64, 96\] end past the data section \(91 bytes; "
                          r"truncated file\?\)", tensor="y")

  def test_file_shrinking_after_open(self):
    f = safetensors_io.SafetensorsFile(self._write(_raw(_header())))
    os.truncate(self.path, 20)
    with self.assertRaisesRegex(CheckpointError, re.escape(self.path) + r": file changed size"):
      f.get("a")

  def test_get_of_an_absent_tensor(self):
    f = safetensors_io.SafetensorsFile(self._write(_raw(_header())))
    with self.assertRaisesRegex(CheckpointError, re.escape(self.path) + r": no tensor 'c'"):
      f.get("c")

  def test_fp8_dequantize_rejects_non_matrix(self):
    with self.assertRaisesRegex(ValueError, r"2-D"):
      safetensors_io.dequantize_fp8(np.zeros(4, ml_dtypes.float8_e4m3fn), np.ones((1, 1), np.float32))


if __name__ == "__main__":
  absltest.main()
