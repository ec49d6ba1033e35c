"""Deterministic train/validation assignment of documents by a stable hash of their key.

The key is a document's relative path (or `path:line` for a JSONL record), so the split does not
depend on the machine, the file order on disk, Python's hash seed or the number of documents.
"""

import hashlib

VALIDATION_PERCENT = 3.0  # of documents (by count, not bytes), in expectation


def is_validation(key: str, validation_percent: float = VALIDATION_PERCENT) -> bool:
  """True if the document named `key` belongs to the validation split."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % 10_000  # 0.01 % resolution
  return bucket < round(validation_percent * 100)


def split_of(key: str, validation_percent: float = VALIDATION_PERCENT) -> str:
  return "validation" if is_validation(key, validation_percent) else "train"
