"""Packing on synthetic token streams, and resuming it through JSON (grain 0.2.18's packer needs the
state fix in data.packing for that)."""

import json

from absl.testing import absltest
from absl.testing import parameterized
import grain
import numpy as np

from data import packing

T = 8


def _docs(seed=0, n=40):
  rng = np.random.default_rng(seed)
  lengths = rng.choice([1, 2, 3, T - 1, T, T + 1, 2 * T, 3 * T + 2], size=n)
  return [np.arange(1, m + 1, dtype=np.int32) + 100 * i for i, m in enumerate(lengths)]


def _rows(docs, fix_state=True):
  ds = packing.pack(grain.MapDataset.source(docs).map(lambda d: {"tokens": d}).to_iter_dataset(), T)
  return packing.StateFixIterDataset(ds) if fix_state else ds


class PackingTest(parameterized.TestCase):

  def test_rows_reproduce_the_documents(self):
    docs = _docs()
    rows = list(_rows(docs))
    stream, d, off = [], 0, 0
    for row in rows:
      self.assertEqual({k: v.shape for k, v in row.items()}, {k: (T,) for k in row})
      seg, pos, tok = row["segment_ids"], row["positions"], row["tokens"]
      self.assertTrue((np.diff(seg[seg > 0]) >= 0).all())
      for s in range(1, seg.max() + 1):
        piece = tok[seg == s]
        np.testing.assert_array_equal(pos[seg == s], np.arange(len(piece)))
        np.testing.assert_array_equal(piece, docs[d][off:off + len(piece)])
        off += len(piece)
        if off == len(docs[d]):
          d, off = d + 1, 0
      stream.append(tok[seg > 0])
    self.assertEqual(d, len(docs))
    np.testing.assert_array_equal(np.concatenate(stream), np.concatenate(docs))
    self.assertTrue(all((r["segment_ids"] > 0).all() for r in rows[:-1]))  # only the last row pads

  def test_state_fix_restores_tuples(self):
    state = {"parents": [{"remainder_slices": {"tokens": [-1, -1]}, "x": [1, 2]}]}
    fixed = packing.restore_tuples(state)
    self.assertEqual(fixed["parents"][0]["remainder_slices"]["tokens"], (-1, -1))
    self.assertEqual(fixed["parents"][0]["x"], [1, 2])

  def test_resume_through_json_at_every_row(self):
    docs = _docs(seed=1)
    full = list(_rows(docs))
    for k in range(len(full)):
      it = iter(_rows(docs))
      for _ in range(k):
        next(it)
      state = json.loads(json.dumps(it.get_state()))
      fresh = iter(_rows(docs))
      fresh.set_state(state)
      rest = list(fresh)
      self.assertLen(rest, len(full) - k)
      for a, b in zip(rest, full[k:]):
        for key in a:
          np.testing.assert_array_equal(a[key], b[key])

  def test_unfixed_grain_state_loses_documents(self):
    # Documents the grain behaviour the fix exists for; if this starts failing, grain fixed it.
    docs = _docs(seed=1)
    full = list(_rows(docs, fix_state=False))
    broken = 0
    for k in range(len(full)):
      it = iter(_rows(docs, fix_state=False))
      for _ in range(k):
        next(it)
      state = json.loads(json.dumps(it.get_state()))
      fresh = iter(_rows(docs, fix_state=False))
      fresh.set_state(state)
      broken += len(list(fresh)) != len(full) - k or False
    self.assertGreater(broken, 0)


if __name__ == "__main__":
  absltest.main()
