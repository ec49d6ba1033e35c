"""Supervised fine-tuning data: `data_config.dataset = "sft_jsonl"`.

  data_config.sft_files = "~/sft/train*.jsonl"         # comma-separated globs
  data_config.sft_eval_files = ""                      # "" = hold out ~5 % of sft_files
  it = pipeline.make_iterator(data_config, split="train", seq_len=128, global_batch_size=16)
  batch = next(it)   # tokens, segment_ids, positions, loss_mask: np.int32 [16 // process_count, 128]
  examples = sft.load(data_config, "train", seq_len=128, tokenizer=tok)   # .counts for the log

Files. Each non-blank line of a JSONL file is one example, `{"prompt", "completion"}` or
`{"messages": [...]}` (see data/chat.py, which renders them into tokens and a loss mask). Files are read
in sorted order, in memory (no TFDS build); a line that is not an example is a ValueError naming
`file:line`, and a glob matching no file is a ValueError naming the glob.

Split. With `sft_eval_files` set, train = sft_files and validation = sft_eval_files. Otherwise line n of
a file goes to validation when `data.split.is_validation(f"{basename}:{n}", VALIDATION_PERCENT)`; if
that leaves validation empty and there are >= 2 examples, the last example read goes to validation; if
it leaves train empty, the first goes to train. The split depends only on file names and line numbers.

Length. An example longer than seq_len loses prompt tokens from the left (after the BOS, which is
kept) as long as at least one token before its first trained token remains; otherwise it is skipped as
too long. Examples with no trained token but EOS (empty completions) are skipped. `load` counts both
({examples, truncated_prompts, skipped_empty, skipped_too_long}; `examples` = kept) and logs them once.

Batches. Whole examples are packed into rows first-fit (grain's FirstFitPackIterDataset with
max(global_batch_size, MIN_PACKING_BINS) bins: an example never spans two rows); `segment_ids` number
the examples of a row 1, 2, … (0 = padding), `positions` restart at 0 per example, `loss_mask` is 0 on
prompts and padding. Every process packs the same global batches (SFT sets are small) and keeps rows
p::P. num_epochs=None: infinite, seeded and reshuffled every epoch, resumable with get_state/set_state
(JSON-able); num_epochs=k: k passes, the last batch padded with empty rows.
"""

import dataclasses
import functools
import glob
import json
import os

from absl import logging
import grain
from grain import experimental as grain_exp
import numpy as np

from data import chat
from data import split as split_lib

VALIDATION_PERCENT = 5.0  # of sft_files lines held out when sft_eval_files is empty

encode_example = chat.encode_example
prompt_tokens = chat.prompt_tokens

# First-fit bins open at once (at least global_batch_size): more bins, fuller rows; rows of one packing
# round feed consecutive batches.
MIN_PACKING_BINS = 64

_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_COUNTS = ("examples", "truncated_prompts", "skipped_empty", "skipped_too_long")


@dataclasses.dataclass
class SftExamples:
  """Encoded examples of one split, each int32 [n_i] with n_i <= seq_len."""
  tokens: list[np.ndarray]
  loss_masks: list[np.ndarray]
  counts: dict[str, int]


def resolve_files(patterns: str, *, none_message: str = "dataset 'sft_jsonl' needs JSONL files: set "
                  "data_config.sft_files to a glob.", label: str = "sft") -> list[str]:
  """Sorted, distinct files matched by comma-separated globs; ValueError(none_message) when there is no
  glob, and one naming a `label` glob that matches no file."""
  globs = [p.strip() for p in (patterns or "").split(",") if p.strip()]
  if not globs:
    raise ValueError(none_message)
  files = set()
  for pattern in globs:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matched:
      raise ValueError(f"{label} glob {pattern!r} matches no file.")
    files.update(os.path.abspath(p) for p in matched)
  return sorted(files)


def read_examples(path: str, check=None) -> list[tuple[str, int, dict]]:
  """(path, line number from 1, example) for each non-blank line of a JSONL file; `check(example)`
  (default `chat.check_example`) raises ValueError for a bad one, reported as path:line."""
  check = chat.check_example if check is None else check
  out = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
        if not line.strip():
          continue
        try:
          example = json.loads(line)
        except ValueError as e:
          raise ValueError(f"not valid JSON ({e})") from None
        check(example)
      except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}:{n}: {e}") from None
      out.append((path, n, example))
  return out


def split_examples(records: list[tuple[str, int, dict]], split: str) -> list[tuple[str, int, dict]]:
  """The records of `split` under the held-out rule of the module docstring."""
  keys = [f"{os.path.basename(path)}:{n}" for path, n, _ in records]
  held = [split_lib.is_validation(key, VALIDATION_PERCENT) for key in keys]
  if len(records) >= 2 and not any(held):
    held[-1] = True
  if len(records) >= 2 and all(held):
    held[0] = False
  return [r for r, h in zip(records, held) if h == (split == "validation")]


def split_records(data_config, split: str) -> list[tuple[str, int, dict]]:
  """(path, line, example) of `split` ('train' | 'validation') in file order, before encoding."""
  if split not in ("train", "validation"):
    raise ValueError(f"sft_jsonl has splits 'train' and 'validation' (no slicing), got {split!r}.")
  eval_files = data_config.get("sft_eval_files", "")
  patterns = eval_files if eval_files and split == "validation" else data_config.get("sft_files", "")
  records = [r for path in resolve_files(patterns) for r in read_examples(path)]
  return records if eval_files else split_examples(records, split)


def fit(tokens: np.ndarray, mask: np.ndarray, seq_len: int, bos_id: int | None):
  """(tokens, mask, "ok" | "truncated" | "too_long"): left-truncates the prompt to fit seq_len."""
  n = len(tokens)
  if n <= seq_len:
    return tokens, mask, "ok"
  head = 1 if bos_id is not None and tokens[0] == bos_id else 0
  cut = n - seq_len
  first_trained = int(np.argmax(mask > 0))
  if head + cut >= first_trained:  # no prompt token would be left before the trained part
    return tokens, mask, "too_long"
  keep = np.r_[0:head, head + cut:n]
  return tokens[keep], mask[keep], "truncated"


def load(data_config, split: str, seq_len: int, tokenizer) -> SftExamples:
  """The encoded, length-fitted examples of `split`; logs the counts once."""
  template = chat.resolve_template(data_config)
  counts = dict.fromkeys(_COUNTS, 0)
  tokens, masks = [], []
  for path, n, example in split_records(data_config, split):
    try:
      t, m = chat.encode_example(example, tokenizer, template)
    except ValueError as e:
      raise ValueError(f"{path}:{n}: {e}") from None
    if not np.any((m > 0) & (t != tokenizer.eos_id)):
      counts["skipped_empty"] += 1
      continue
    t, m, status = fit(t, m, seq_len, tokenizer.bos_id)
    if status == "too_long":
      counts["skipped_too_long"] += 1
      continue
    counts["truncated_prompts"] += int(status == "truncated")
    tokens.append(t)
    masks.append(m)
  counts["examples"] = len(tokens)
  log = logging.warning if any(counts[k] for k in _COUNTS[1:]) else logging.info
  log("sft_jsonl %s (seq_len %d): %d examples; %d prompts truncated, %d skipped as empty, %d skipped "
      "as too long.", split, seq_len, counts["examples"], counts["truncated_prompts"],
      counts["skipped_empty"], counts["skipped_too_long"])
  return SftExamples(tokens, masks, counts)


_cache: dict = {}


def _cached_load(data_config, split, seq_len, tokenizer) -> SftExamples:
  """`load`, reused while the config and the files (mtime, size) are unchanged: eval runs repeatedly."""
  fields = ("sft_files", "sft_eval_files", "chat_template", "tokenizer", "tokenizer_path")
  patterns = ",".join(data_config.get(k, "") for k in fields[:2])
  stats = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in resolve_files(patterns))
  key = (split, seq_len, stats, *(data_config.get(k, "") for k in fields))
  if key not in _cache:
    if len(_cache) >= 4:
      _cache.pop(next(iter(_cache)))
    _cache[key] = load(data_config, split, seq_len, tokenizer)
  return _cache[key]


def make_dataset(data_config, split: str, seq_len: int, global_batch_size: int, tokenizer, *,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """Batches {tokens, segment_ids, positions, loss_mask} of this process (pad tokens still 0)."""
  examples = _cached_load(data_config, split, seq_len, tokenizer)
  if not examples.tokens:
    raise ValueError(f"sft_jsonl split {split!r} has no example that fits seq_len {seq_len} "
                     f"({examples.counts}).")
  rows = [{"tokens": t, "loss_mask": m} for t, m in zip(examples.tokens, examples.loss_masks)]
  ds = grain.MapDataset.source(rows)
  shuffle = data_config.get("shuffle", True)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # reshuffled every epoch (the seed is folded with the epoch)
  ds = ds.repeat(num_epochs).to_iter_dataset(_NO_THREADS)
  packed = grain_exp.FirstFitPackIterDataset(
      ds, length_struct={"tokens": seq_len, "loss_mask": seq_len},
      num_packing_bins=max(global_batch_size, MIN_PACKING_BINS), seed=seed, shuffle_bins=shuffle)
  batches = packed.map(_rename).batch(
      global_batch_size, drop_remainder=False,
      batch_fn=functools.partial(grain_exp.batch_and_pad, batch_size=global_batch_size))
  return batches.map(functools.partial(_process_rows, start=process_index, step=process_count))


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"], "loss_mask": row["loss_mask"]}


def _process_rows(batch, *, start: int, step: int) -> dict[str, np.ndarray]:
  return {k: np.ascontiguousarray(v[start::step]) for k, v in batch.items()}
