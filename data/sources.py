"""From a data config to a TFDS random-access data source: name → builder → (build once) → source.

Checks what it can before doing anything heavy: the dataset name, the text_files glob, the split, and
whether an existing build directory holds a complete dataset. A missing build is made on first use
(~1 s for the stdlib corpus) into `data_dir` (default ~/.cache/deepseek_jax/tfds) and reused later.

Multi-host: concurrent first builds into one shared data_dir race (TFDS renames a finished temp dir
into place); call `prepare(data_config)` once on one host (or let process 0 build) before the others.
"""

import json
import os
import platform
import re

from absl import logging

# sft_jsonl: in memory (data/sft.py), no TFDS. arithmetic: data/arithmetic.py's problems, "37+48=85" per document.
DATASETS = ("python_stdlib", "text_files", "sft_jsonl", "arithmetic")
ARITHMETIC_CONFIGS = ("d2", "d3", "decimal")
SPLITS = ("train", "validation")
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "deepseek_jax", "tfds")


def data_dir_of(data_config) -> str:
  return os.path.abspath(os.path.expanduser(data_config.get("data_dir", "") or DEFAULT_DATA_DIR))


def parse_dataset(name: str) -> tuple[str, str | None]:
  """`python_stdlib` | `python_stdlib/full` | `text_files` | `sft_jsonl` | `arithmetic[/d3]` → (dataset, config
  or None)."""
  base, _, config = (name or "").partition("/")
  if base not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS} (python_stdlib may take "
                     "a config: python_stdlib/lib, python_stdlib/full).")
  if base == "python_stdlib" and config not in ("", "lib", "full"):
    raise ValueError(f"Unknown python_stdlib config {config!r}; expected lib or full.")
  if base == "arithmetic" and config not in ("", *ARITHMETIC_CONFIGS):
    raise ValueError(f"Unknown arithmetic config {config!r}; expected one of {ARITHMETIC_CONFIGS}.")
  if base == "text_files" and config:
    raise ValueError("text_files takes its files from data_config.text_files, not a config name.")
  if base == "sft_jsonl" and config:
    raise ValueError("sft_jsonl takes its files from data_config.sft_files, not a config name.")
  return base, config or None


def check_split(split: str) -> None:
  """Accepts TFDS split syntax over our two splits: 'train', 'validation[:50%]', ..."""
  if not re.match(rf"^({'|'.join(SPLITS)})(\[.*\])?$", split or ""):
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS} (TFDS slicing allowed).")


def _builder_spec(data_config):
  """(builder class, kwargs) for the configured dataset; cheap (no TFDS build, no reading data)."""
  base, config = parse_dataset(data_config.get("dataset", ""))
  if base == "sft_jsonl":
    raise ValueError("sft_jsonl has no TFDS build: data.sft reads its JSONL files in memory.")
  if base == "python_stdlib":
    from data import stdlib_corpus  # pylint: disable=g-import-not-at-top
    return stdlib_corpus.StdlibSource, dict(config=config or stdlib_corpus.StdlibSource.DEFAULT_CONFIG_NAME)
  if base == "arithmetic":
    from data import arithmetic  # pylint: disable=g-import-not-at-top
    return arithmetic.ArithmeticSource, dict(config=config or arithmetic.ArithmeticSource.DEFAULT_CONFIG_NAME)
  from data import text_files  # pylint: disable=g-import-not-at-top
  return text_files.TextFiles, dict(config=text_files.make_config(data_config.get("text_files", "")))


def _check_existing_build(path: str, name: str) -> None:
  """Raises ValueError if `path` (a dataset version dir) exists but is not a complete TFDS build."""
  def corrupt(why):
    return ValueError(f"Data dir {path} holds an incomplete or corrupt dataset ({why}). Delete that "
                      "directory to rebuild it, or point data_config.data_dir elsewhere.")
  if not os.path.isdir(path):
    raise corrupt("not a directory")
  info_path = os.path.join(path, "dataset_info.json")
  try:
    with open(info_path, encoding="utf-8") as f:
      info = json.load(f)
  except FileNotFoundError:
    raise corrupt("no dataset_info.json") from None
  except (OSError, ValueError) as e:
    raise corrupt(f"unreadable dataset_info.json: {e}") from None
  if "array_record" not in (info.get("fileFormat"), *info.get("alternativeFileFormats", ())):
    raise corrupt(f"file format {info.get('fileFormat')!r}, need array_record")
  splits = {s.get("name"): s for s in info.get("splits", [])}
  if not splits:
    raise corrupt("no splits")
  for split in splits:
    shards = [int(n) for n in splits[split].get("shardLengths", [])]
    for i in range(len(shards)):
      shard = os.path.join(path, f"{name}-{split}.array_record-{i:05d}-of-{len(shards):05d}")
      if not os.path.isfile(shard) or (shards[i] and os.path.getsize(shard) == 0):
        raise corrupt(f"missing or empty shard {os.path.basename(shard)}")


def get_builder(data_config):
  """The TFDS builder for `data_config`, built into data_dir first if it is not there yet."""
  cls, kwargs = _builder_spec(data_config)
  data_dir = data_dir_of(data_config)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"data_dir {data_dir} exists and is not a directory.")
  config_name = kwargs["config"] if isinstance(kwargs["config"], str) else kwargs["config"].name
  version_dir = os.path.join(data_dir, cls.name, config_name, str(cls.VERSION))
  exists = os.path.exists(version_dir)
  if exists:
    _check_existing_build(version_dir, cls.name)

  builder = cls(data_dir=data_dir, **kwargs)
  if not exists:
    logging.info("Building dataset %s/%s into %s (first use; reused afterwards).",
                 cls.name, config_name, builder.data_path)
    builder.download_and_prepare(file_format="array_record")
  _warn_if_stale(builder)
  return builder


_warned_stale = set()


def _warn_if_stale(builder) -> None:
  built_with = (builder.info.metadata or {}).get("python_version")
  if built_with and built_with != platform.python_version() and builder.data_path not in _warned_stale:
    _warned_stale.add(builder.data_path)
    logging.warning("%s was built from Python %s's stdlib; this is Python %s. Delete %s to rebuild.",
                    builder.name, built_with, platform.python_version(), builder.data_path)


def prepare(data_config) -> str:
  """Builds the configured dataset if needed (e.g. once, before a multi-host run); returns its path.

  sft_jsonl needs no build: returns "".
  """
  if parse_dataset(data_config.get("dataset", ""))[0] == "sft_jsonl":
    return ""
  return str(get_builder(data_config).data_path)


def data_source(data_config, split: str):
  """A random-access TFDS `ArrayRecordDataSource` of `split` (examples: {'text': bytes, 'path': bytes}).

  What `tfds.data_source(name, split=split, data_dir=..., builder_kwargs=...,
  download_and_prepare_kwargs={"file_format": "array_record"})` does, plus the checks above. (Plain
  `tfds.data_source` would build TFRecord files, which needs TensorFlow.)
  """
  check_split(split)
  builder = get_builder(data_config)
  base_split = split.partition("[")[0]
  source = builder.as_data_source(split=split) if base_split in builder.info.splits else ()
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {builder.name}/{builder.builder_config.name} is empty "
                     f"({builder.data_path}); with few documents, no document may hash into it.")
  return source
