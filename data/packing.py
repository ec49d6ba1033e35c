"""Packing documents into fixed-length rows, on top of grain's concat-then-split packer.

`grain.experimental.ConcatThenSplitIterDataset` concatenates token streams and cuts them into rows of
exactly `seq_len`; each piece of a document in a row gets its own segment id (1, 2, … per row; 0 =
padding) and positions restarting at 0. A document longer than the space left in a row continues in
the next row(s) as a new segment whose positions restart at 0 (no cross-row attention context).

This module adds what the pipeline needs around it:
  * `pack`: one token stream → packed rows {tokens, segment_ids, positions} (the names the model uses).
  * `StateFixIterDataset`: grain 0.2.18's packer keeps tuples in its state and compares them with
    `!=` to a tuple sentinel after restore; JSON (what grain's Orbax handler writes) turns them into
    lists, so a restored packer mistakes "no remainder" for "a remainder" and drops a document. This
    wrapper turns those lists back into tuples in `set_state`.
"""

from typing import Any

import grain
from grain import experimental as grain_exp
import numpy as np

_CTS_SLICES_KEY = "remainder_slices"


def pack(tokens_ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """{'tokens': int32 [n]} documents → {'tokens', 'segment_ids', 'positions'}: int32 [seq_len] rows."""
  packed = grain_exp.ConcatThenSplitIterDataset(tokens_ds, length_struct={"tokens": seq_len})
  return packed.map(_rename)


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
      "tokens": row["tokens"],
      "segment_ids": row["tokens_segment_ids"],
      "positions": row["tokens_positions"],
  }


def restore_tuples(state: Any) -> Any:
  """A copy of a grain iterator state with the packer's (start, stop) slices as tuples again."""
  if isinstance(state, dict):
    out = {}
    for k, v in state.items():
      if k == _CTS_SLICES_KEY and isinstance(v, dict):
        out[k] = {name: tuple(sl) for name, sl in v.items()}
      else:
        out[k] = restore_tuples(v)
    return out
  if isinstance(state, (list, tuple)):
    return type(state)(restore_tuples(v) for v in state)
  return state


class StateFixIterDataset(grain.IterDataset):
  """Identity on elements; makes `set_state` accept states that went through JSON."""

  def __iter__(self):
    return _StateFixIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "StateFixIterDataset"


class _StateFixIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(restore_tuples(state))
