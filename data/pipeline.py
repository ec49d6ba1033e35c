"""The grain input pipeline: TFDS documents → tokenize → pack into rows → batch → this process's rows.

  from data import config, pipeline
  data_config = config.default_data_config()          # python_stdlib corpus, byte tokenizer
  it = pipeline.make_iterator(data_config, split="train", seq_len=256, global_batch_size=16,
                              process_index=0, process_count=1, seed=0)   # infinite for train
  batch = next(it)     # {'tokens', 'segment_ids', 'positions'}: np.int32 [16 // process_count, 256]
  state = it.get_state(); it.set_state(state)          # JSON-able dict, for checkpointing
  ev = pipeline.make_iterator(data_config, split="validation", seq_len=256, global_batch_size=16,
                              num_epochs=1)            # finite; the tail is padded (segment_ids 0)
  tok = pipeline.make_tokenizer(data_config)

Batches. `tokens` holds documents packed back to back; `segment_ids` numbers the documents (pieces)
within a row 1, 2, 3, … with 0 for padding (whose tokens are `tok.pad_id`); `positions` restart at 0
for every segment. Each document is `[bos] + encode(text) + [eos]` (`document_tokens`; BOS only when
the tokenizer has one: the byte tokenizer has none). A document that does not fit in the rest of a row
continues in the next row as a new segment with positions from 0 again. Attention masking by segment
is the model's job.

Layout. An infinite iterator (num_epochs=None, for training) gives every row of the global batch its
own stream: the (seeded, per-epoch reshuffled, repeated) document sequence is dealt round-robin to
`global_batch_size` streams, stream r is packed independently and becomes row r of every global batch.
So a batch draws on `global_batch_size` different documents even when documents are much longer than a
row (stdlib files average ~17k bytes), and process p builds only rows p, p+P, p+2P, … (P =
process_count): processes never duplicate work or data, and together they produce exactly the
single-process global batch, whatever P is. A finite iterator (num_epochs=k, for evaluation) packs the
documents as one stream (no padding until the very end), batches `global_batch_size` rows, pads the
last batch with empty rows, and process p keeps rows p::P; every process yields the same number of
batches, as multi-host eval needs.

Determinism. The order depends only on (dataset build, tokenizer, seq_len, global_batch_size, seed);
`it.get_state()` after k batches, restored with `set_state` into a fresh `make_iterator(...)` with the
same arguments, continues with exactly the batches the original would have produced. The state is a
JSON-serialisable dict. With Orbax, save it beside the train state:

  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                             data=grain.checkpoint.CheckpointRestore(it)))  # in place

SFT. `dataset = "sft_jsonl"` reads prompt/completion or chat JSONL files in memory instead (see
data/sft.py): whole examples are packed first-fit (never split across rows), batches carry a fourth
array `loss_mask` (1 on completion tokens), and the rest of this contract holds as described there.

`worker_count` > 0 moves the pipeline into that many grain worker processes (`mp_prefetch`; each works
on a slice of the documents, so the order differs from worker_count=0 but is just as deterministic and
resumable); 0 runs it synchronously in the calling process (~1 ms per 16×256 byte-token batch on
one CPU core; no background threads, which grain does not shut down cleanly at interpreter exit).
Call `it.close()` when done with an iterator that has workers. Workers need the process's absl flags
parsed (grain reads its own when starting them): absl entry points such as train.py have them; elsewhere
call `absl.flags.FLAGS.mark_as_parsed()` first, or `make_dataset` raises.
"""

import functools

from absl import flags
import grain
from grain import experimental as grain_exp
import numpy as np

from data import packing
from data import sources
from data import tokenizers

_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def make_tokenizer(data_config) -> tokenizers.Tokenizer:
  """The tokenizer named by data_config.tokenizer (byte | sentencepiece | hf) and tokenizer_path."""
  return tokenizers.from_name(data_config.get("tokenizer", "byte"), data_config.get("tokenizer_path", ""))


def document_tokens(tok: tokenizers.Tokenizer, text: str | bytes) -> np.ndarray:
  """int32 [n]: the token stream of one document as the pipeline packs it: [bos] + encode(text) + [eos]."""
  body = tok.encode_array(text)
  head = [] if tok.bos_id is None else [tok.bos_id]
  return np.concatenate([np.asarray(head, np.int32), body, np.asarray([tok.eos_id], np.int32)])


class _Tokenize:
  """TFDS example → {'tokens': int32 [n]}. A class (not a lambda) so worker processes can unpickle it."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self.tok = tok

  def __call__(self, example) -> dict[str, np.ndarray]:
    return {"tokens": document_tokens(self.tok, example["text"])}


def _check_args(data_config, seq_len, global_batch_size, process_index, process_count, num_epochs):
  """Everything that can be checked without touching data, so bad configs fail fast."""
  sources.parse_dataset(data_config.get("dataset", ""))
  if data_config.get("tokenizer", "byte") not in tokenizers.TOKENIZERS:
    raise ValueError(f"Unknown tokenizer {data_config.get('tokenizer')!r}; "
                     f"expected one of {tokenizers.TOKENIZERS}.")
  if seq_len < 1 or global_batch_size < 1:
    raise ValueError(f"seq_len ({seq_len}) and global_batch_size ({global_batch_size}) must be positive.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count "
                     f"{process_count}.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}.")
  if data_config.get("worker_count", 0) < 0:
    raise ValueError(f"worker_count must be >= 0, got {data_config.get('worker_count')}.")
  if data_config.get("worker_count", 0) > 0 and not flags.FLAGS.is_parsed():
    # Starting worker processes, grain reads its own absl flag --grain_enable_multiprocess_worker_profiling
    # without a default fallback. Parsing the process's flags is the entry point's business, not ours.
    raise ValueError("worker_count > 0 needs absl flags parsed (grain reads its --grain_* flags when it "
                     "starts workers): run under absl.app.run as train.py and eval.py do, or parse them "
                     "first (absl.flags.FLAGS.mark_as_parsed() keeps every default); or use worker_count=0.")


def make_dataset(data_config, split: str, seq_len: int, global_batch_size: int, *,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """The grain IterDataset behind `make_iterator` (same arguments); iterate it to get batches."""
  _check_args(data_config, seq_len, global_batch_size, process_index, process_count, num_epochs)
  sources.check_split(split)
  tok = make_tokenizer(data_config)  # loads the model file: fails before any dataset build
  if sources.parse_dataset(data_config.get("dataset", ""))[0] == "sft_jsonl":
    from data import sft  # pylint: disable=g-import-not-at-top
    ds = sft.make_dataset(data_config, split, seq_len, global_batch_size, tok, process_index=process_index,
                          process_count=process_count, seed=seed, num_epochs=num_epochs)
    return _finish(ds, data_config, tok)
  docs = grain.MapDataset.source(sources.data_source(data_config, split))
  if data_config.get("shuffle", True):
    docs = docs.shuffle(seed=seed)  # reshuffled every epoch (the seed is folded with the epoch)
  docs = docs.repeat(num_epochs)
  tokenize = _Tokenize(tok)

  if num_epochs is None:
    streams = [
        packing.pack(docs[row::global_batch_size].map(tokenize).to_iter_dataset(_NO_THREADS), seq_len)
        for row in range(process_index, global_batch_size, process_count)
    ]
    ds = grain_exp.ZipIterDataset(streams, strict=False).map(_stack_rows)
  else:
    rows = packing.pack(docs.map(tokenize).to_iter_dataset(_NO_THREADS), seq_len)
    ds = rows.batch(global_batch_size, drop_remainder=False,
                    batch_fn=functools.partial(grain_exp.batch_and_pad, batch_size=global_batch_size))
    ds = ds.map(functools.partial(_process_rows, start=process_index, step=process_count))
  return _finish(ds, data_config, tok)


def _finish(ds: grain.IterDataset, data_config, tok: tokenizers.Tokenizer) -> grain.IterDataset:
  """Pad tokens, JSON-proof state, and the worker processes if any."""
  ds = packing.StateFixIterDataset(ds.map(functools.partial(_fill_padding, pad_id=tok.pad_id)))
  workers = data_config.get("worker_count", 0)
  if workers > 0:
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def make_iterator(data_config, split: str, seq_len: int, global_batch_size: int, *,
                  process_index: int = 0, process_count: int = 1, seed: int = 0,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
  """Batches of this process: dicts of np.int32 [global_batch_size // process_count, seq_len].

  Args:
    data_config: ConfigDict (or dict) as made by `data.config.default_data_config()`.
    split: 'train' or 'validation' (TFDS slicing such as 'train[:10%]' is accepted).
    seq_len: tokens per row.
    global_batch_size: rows per step over all processes; must be divisible by process_count.
    process_index, process_count: this process and how many share the global batch
      (`jax.process_index()`, `jax.process_count()`).
    seed: shuffle seed; pass the run's seed.
    num_epochs: None = repeat forever (training); k = k passes, then StopIteration (evaluation).

  Raises:
    ValueError: unknown dataset/tokenizer/split, missing text_files glob, corrupt data dir,
      indivisible batch, bad process index — before any dataset is built; for sft_jsonl, a glob
      matching no file or a malformed line (file:line).
  """
  return iter(make_dataset(data_config, split, seq_len, global_batch_size, process_index=process_index,
                           process_count=process_count, seed=seed, num_epochs=num_epochs))


def _stack_rows(rows) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _process_rows(batch, *, start: int, step: int) -> dict[str, np.ndarray]:
  return {k: np.ascontiguousarray(v[start::step]) for k, v in batch.items()}


def _fill_padding(batch, *, pad_id: int) -> dict[str, np.ndarray]:
  out = {k: np.asarray(v, dtype=np.int32) for k, v in batch.items()}
  if pad_id != 0:
    out["tokens"] = np.where(out["segment_ids"] == 0, np.int32(pad_id), out["tokens"])
  return out
