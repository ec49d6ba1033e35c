"""The grain pipeline: packing invariants, document streams, resume determinism, process sharding,
errors. Runs on a small generated corpus (the text_files builder) in a temporary data dir."""

import json
import os
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np

import datatest_util
from data import config as config_lib
from data import pipeline
from data import sources

T = 64  # seq_len
G = 4  # global batch


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(test, a, b):
  test.assertLen(a, len(b))
  for x, y in zip(a, b):
    chex.assert_trees_all_equal(x, y)


def _doc_streams(cfg, split="train"):
  """document_tokens of every document, in stored order."""
  tok = pipeline.make_tokenizer(cfg)
  source = sources.data_source(cfg, split)
  return [pipeline.document_tokens(tok, source[i]["text"]) for i in range(len(source))]


def _check_rows(test, batch, pad_id=0):
  """Row invariants; returns per row the list of (segment tokens, segment ends the row)."""
  tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  rows = []
  for r in range(tokens.shape[0]):
    s, p, t = seg[r], pos[r], tokens[r]
    n = int((s > 0).sum())
    test.assertTrue((s[:n] > 0).all() and (s[n:] == 0).all(), "padding only at the end")
    test.assertTrue((t[n:] == pad_id).all())
    pieces = []
    for i in range(n):
      if i == 0 or s[i] != s[i - 1]:
        test.assertEqual(s[i], 1 if i == 0 else s[i - 1] + 1)  # 1, 2, 3, ... in order
        test.assertEqual(p[i], 0)  # positions restart at each segment
        start = i
      else:
        test.assertEqual(p[i], p[i - 1] + 1)
      if i == n - 1 or s[i + 1] != s[i]:
        pieces.append((t[start:i + 1], i == tokens.shape[1] - 1))
    rows.append(pieces)
  return rows


def _walk(test, pieces, docs):
  """Checks that pieces (segment tokens, reaches-row-end) concatenate to `docs` in order, cutting a
  document only where a row is full. Returns the number of whole documents seen."""
  d = off = 0
  for piece, at_row_end in pieces:
    doc = docs[d % len(docs)]
    np.testing.assert_array_equal(piece, doc[off:off + len(piece)])
    off += len(piece)
    if off == len(doc):
      d, off = d + 1, 0
    else:
      test.assertTrue(at_row_end, "a document is cut only at the end of a row")
  return d


class PipelineTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.cfg = datatest_util.text_files_config()

  def _iter(self, cfg=None, split="train", **kwargs):
    args = dict(seq_len=T, global_batch_size=G, seed=3)
    args.update(kwargs)
    return pipeline.make_iterator(cfg or self.cfg, split, **args)

  def test_shapes_and_dtypes(self):
    for num_epochs in (None, 1):
      batch = next(self._iter(num_epochs=num_epochs, process_index=1, process_count=2))
      self.assertEqual(set(batch), {"tokens", "segment_ids", "positions"})
      for v in batch.values():
        chex.assert_shape(v, (G // 2, T))
        self.assertEqual(v.dtype, np.int32)

  def test_finite_iterator_packs_every_document_once_in_order(self):
    cfg = datatest_util.text_files_config(shuffle=False)
    docs = _doc_streams(cfg, "validation")
    batches = list(self._iter(cfg, "validation", num_epochs=1))
    pieces = [p for b in batches for row in _check_rows(self, b) for p in row]
    self.assertEqual(_walk(self, pieces, docs), len(docs))
    total = sum(len(d) for d in docs)
    self.assertEqual(sum(int((b["segment_ids"] > 0).sum()) for b in batches), total)
    self.assertEqual(len(batches), -(-total // (G * T)))  # no padding before the end
    self.assertTrue((batches[-1]["segment_ids"][-1] == 0).all())  # the tail is padded

  def test_infinite_iterator_gives_each_row_its_own_document_stream(self):
    cfg = datatest_util.text_files_config(shuffle=False)
    docs = _doc_streams(cfg)
    batches = _take(self._iter(cfg, seq_len=256), 40)
    rows = [_check_rows(self, b) for b in batches]
    for r in range(G):
      stream = [p for b in rows for p in b[r]]
      # Row r carries documents r, r+G, r+2G, ... of the (repeated) document sequence.
      seen = _walk(self, stream, [docs[(r + G * j) % len(docs)] for j in range(len(docs) * G)])
      self.assertGreaterEqual(seen, 3)

  @parameterized.parameters("sentencepiece", "hf")
  def test_other_tokenizers(self, name):
    tmp = tempfile.mkdtemp()
    path = (datatest_util.sentencepiece_model(tmp) if name == "sentencepiece"
            else datatest_util.hf_tokenizer_dir(tmp, with_config=True))
    cfg = datatest_util.text_files_config(shuffle=False, tokenizer=name, tokenizer_path=path)
    tok = pipeline.make_tokenizer(cfg)
    self.assertIsNotNone(tok.bos_id)
    docs = _doc_streams(cfg, "validation")
    self.assertTrue(all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs))
    batches = list(self._iter(cfg, "validation", num_epochs=1))
    pieces = [p for b in batches for row in _check_rows(self, b, pad_id=tok.pad_id) for p in row]
    self.assertEqual(_walk(self, pieces, docs), len(docs))
    if name == "hf":
      self.assertEqual(tok.pad_id, tok.eos_id)  # tokenizer_config.json: pad_token null
      self.assertNotEqual(tok.pad_id, 0)
      self.assertTrue((batches[-1]["tokens"][batches[-1]["segment_ids"] == 0] == tok.pad_id).all())

  def test_shuffle_is_seeded_and_new_every_epoch(self):
    cfg = datatest_util.text_files_config()
    source = sources.data_source(cfg, "train")
    texts = [source[i]["text"] for i in range(len(source))]
    def order(seed):
      it = self._iter(cfg, num_epochs=2, global_batch_size=1, seq_len=1024, seed=seed)
      stream = b"".join(bytes(b["tokens"][b["segment_ids"] > 0].astype(np.uint8)) for b in it)
      return [texts.index(t) for t in stream.split(b"\0")[:-1]]  # byte tokenizer: EOS is 0
    a = order(0)
    self.assertLen(a, 2 * len(texts))
    epoch0, epoch1 = a[:len(texts)], a[len(texts):]
    self.assertCountEqual(epoch0, range(len(texts)))
    self.assertCountEqual(epoch1, range(len(texts)))
    self.assertNotEqual(epoch0, epoch1)
    self.assertNotEqual(epoch0, sorted(epoch0))
    self.assertEqual(order(0), a)
    self.assertNotEqual(order(1), a)

  @parameterized.product(num_epochs=(None, 1), k=(0, 3, 7), process=((0, 1), (1, 2)))
  def test_resume_in_a_fresh_iterator_continues_exactly(self, num_epochs, k, process):
    kwargs = dict(num_epochs=num_epochs, process_index=process[0], process_count=process[1])
    it = self._iter(**kwargs)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 5)
    fresh = self._iter(**kwargs)
    fresh.set_state(state)
    _assert_batches_equal(self, _take(fresh, 5), expected)

  @parameterized.product(num_epochs=(None, 1), process_count=(2, 4))
  def test_process_shards_are_disjoint_and_make_up_the_global_batch(self, num_epochs, process_count):
    split = "train" if num_epochs is None else "validation"
    n = 6
    whole = _take(self._iter(split=split, num_epochs=num_epochs), n)
    parts = [_take(self._iter(split=split, num_epochs=num_epochs, process_index=p,
                              process_count=process_count), n) for p in range(process_count)]
    for i in range(n):
      for key in whole[i]:
        merged = np.empty_like(whole[i][key])
        for p in range(process_count):
          merged[p::process_count] = parts[p][i][key]  # process p holds global rows p, p+P, ...
        np.testing.assert_array_equal(merged, whole[i][key])
    rows = [{r.tobytes() for b in part for r in b["tokens"][(b["segment_ids"] > 0).any(axis=1)]}
            for part in parts]
    for p in range(process_count):
      for q in range(p):
        self.assertEmpty(rows[p] & rows[q])

  def test_orbax_checkpoint_manager_round_trip(self):
    import grain  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    it = self._iter()
    _take(it, 3)
    with ocp.CheckpointManager(tempfile.mkdtemp(prefix="ckpt_")) as mngr:
      mngr.save(3, args=ocp.args.Composite(
          params=ocp.args.StandardSave({"w": np.arange(4.0)}),
          data=grain.checkpoint.CheckpointSave(it)))
      mngr.wait_until_finished()
      expected = _take(it, 4)
      fresh = self._iter()
      restored = mngr.restore(3, args=ocp.args.Composite(
          params=ocp.args.StandardRestore({"w": np.zeros(4)}),
          data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0))
    _assert_batches_equal(self, _take(restored["data"], 4), expected)

  def test_worker_processes_resume(self):
    if not flags.FLAGS.is_parsed():  # as an absl entry point (train.py) has them; see ErrorsTest
      self.addCleanup(flags.FLAGS.unparse_flags)
      flags.FLAGS.mark_as_parsed()
    cfg = datatest_util.text_files_config(worker_count=1)
    it = self._iter(cfg)
    try:
      _take(it, 2)
      state = json.loads(json.dumps(it.get_state()))
      expected = _take(it, 3)
    finally:
      it.close()
    fresh = self._iter(cfg)
    try:
      fresh.set_state(state)
      _assert_batches_equal(self, _take(fresh, 3), expected)
    finally:
      fresh.close()


class ErrorsTest(absltest.TestCase):

  def _tmp(self) -> str:
    return self.enter_context(tempfile.TemporaryDirectory())

  def _raises(self, regex, cfg, **kwargs):
    args = dict(split="train", seq_len=T, global_batch_size=G)
    args.update(kwargs)
    with self.assertRaisesRegex(ValueError, regex):
      pipeline.make_iterator(cfg, **args)

  def test_cheap_errors_come_before_any_build(self):
    data_dir = self._tmp()
    cfg = config_lib.default_data_config()
    cfg.data_dir = data_dir
    self._raises("not divisible by process_count", cfg, global_batch_size=6, process_count=4)
    self._raises("process_index", cfg, process_index=2, process_count=2)
    self._raises("Unknown split", cfg, split="test")
    self._raises("Unknown dataset", _with(cfg, dataset="c4"))
    self._raises("Unknown tokenizer", _with(cfg, tokenizer="wordpiece"))
    self._raises("tokenizer.json not found", _with(cfg, tokenizer="hf", tokenizer_path=""))
    self.assertEmpty(os.listdir(data_dir))  # nothing was built

  def test_worker_processes_need_parsed_flags(self):
    if flags.FLAGS.is_parsed():
      self.skipTest("absl flags are parsed in this process (absltest.main)")
    cfg = _with(config_lib.default_data_config(), data_dir=self._tmp(), worker_count=2)
    self._raises("worker_count > 0 needs absl flags parsed", cfg)
    self.assertEmpty(os.listdir(cfg.data_dir))  # a cheap error: nothing was built

  def test_text_files_glob(self):
    cfg = datatest_util.text_files_config(text_files="")
    self._raises("needs a glob", cfg)
    self._raises("matches no files", _with(cfg, text_files=os.path.join(self._tmp(), "*.txt")))

  def test_corrupt_or_empty_build_dir(self):
    cfg = _with(config_lib.default_data_config(), data_dir=self._tmp())
    version_dir = os.path.join(cfg.data_dir, "python_stdlib", "lib", "1.0.0")
    os.makedirs(version_dir)
    self._raises("incomplete or corrupt.*no dataset_info.json", cfg)
    with open(os.path.join(version_dir, "dataset_info.json"), "w") as f:
      f.write("{not json")
    self._raises("incomplete or corrupt.*unreadable", cfg)
    with open(os.path.join(cfg.data_dir, "file"), "w") as f:
      f.write("x")
    self._raises("not a directory", _with(cfg, data_dir=os.path.join(cfg.data_dir, "file")))

  def test_missing_shard_is_detected(self):
    cfg = datatest_util.text_files_config(data_dir=self._tmp())
    path = sources.prepare(cfg)
    os.remove(os.path.join(path, "text_files-train.array_record-00000-of-00001"))
    self._raises("incomplete or corrupt.*missing or empty shard", cfg)

  def test_empty_split(self):
    corpus = self._tmp()
    with open(os.path.join(corpus, "only.txt"), "w") as f:
      f.write("a single document")  # hashes into train
    cfg = datatest_util.text_files_config(text_files=corpus, data_dir=self._tmp())
    next(pipeline.make_iterator(cfg, "train", seq_len=T, global_batch_size=G))
    self._raises("is empty", cfg, split="validation", num_epochs=1)


def _with(cfg, **overrides):
  out = cfg.copy_and_resolve_references()
  out.update(overrides)
  return out


if __name__ == "__main__":
  absltest.main()
