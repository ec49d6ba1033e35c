"""Checks of a run config's own fields, every problem listed at once, each naming the field.

  problems = config_check.run_config_problems(config)     # [] when every field is in range
  train.py: app.run(main, flags_parser=config_check.flags_parser("config"))   # unknown overrides

The model section is checked by `models.ModelConfig` itself and the mesh by `sharding`; this module
covers the run fields (steps, batch, eval, checkpoints, optimizer, loss weights, data, execution) and
command-line overrides of fields that do not exist (`--config.optim.peak_lrr=...`), which
ml_collections reports as a bare `AttributeError: "'peak_lrr'"`.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import sys
from typing import Any, Callable

from absl import app

import models
import models.lora
from data import sources

# sft: loss only on the batches' loss_mask tokens (completions); grpo: RL on rule-based rewards over sampled
# completions (training/grpo_trainer.py); distill: a frozen teacher's completions or logits (training/distill.py).
OBJECTIVES = ("pretrain", "sft", "grpo", "distill")
DISTILL_MODES = ("sequence", "logits")
LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "dr_grpo")

# field path → (check, what it must be). Missing fields are skipped (configs may predate a field).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "total_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "seq_len": (lambda v: is_int(v) and v >= 3, "an integer >= 3"),
    "grad_accum_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "log_every": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval_every": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: only the final eval)"),
    "eval_batches": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: the whole validation split)"),
    "checkpoint_every": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "keep_checkpoints": (lambda v: is_int(v) and v >= 1, "an integer >= 1 (0 would delete every checkpoint)"),
    "peak_flops_per_device": (lambda v: _real(v) and v >= 0, "a number >= 0 (0: look up the device)"),
    "optim.peak_lr": (lambda v: _real(v) and v > 0, "a number > 0"),
    "optim.min_lr_ratio": (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "optim.warmup_fraction": (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "optim.decay_start_fraction": (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "optim.b1": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.b2": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.eps": (lambda v: _real(v) and v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "optim.clip_norm": (lambda v: _real(v) and v > 0, "a number > 0"),
    "optim.moment_dtype": (lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "loss.balance_alpha": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "loss.mtp_lambda": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "loss.bias_update_speed": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "data.worker_count": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "data.dataset": (lambda v: _known_dataset(v), "python_stdlib, python_stdlib/lib, python_stdlib/full, "
                     "text_files, sft_jsonl, arithmetic or arithmetic/<d2|d3|decimal>"),
    "data.tokenizer": (lambda v: v in ("byte", "sentencepiece", "hf"), "byte, sentencepiece or hf"),
    "objective": (lambda v: v in OBJECTIVES, " or ".join(OBJECTIVES)),
    "init_from": (lambda v: isinstance(v, str), "a path (a workdir, DIR@STEP, or an HF directory) or empty"),
    "grpo.group_size": (lambda v: is_int(v) and v >= 2, "an integer >= 2 (a group of one has no baseline)"),
    "grpo.prompts_per_step": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "grpo.num_iterations": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "grpo.clip_epsilon": (lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
    "grpo.clip_epsilon_high": (lambda v: _real(v) and v >= 0, "a number >= 0 (0: clip_epsilon)"),
    "grpo.kl_beta": (lambda v: _real(v) and v >= 0, "a number >= 0 (0: no reference model)"),
    "grpo.loss_aggregation": (lambda v: v in LOSS_AGGREGATIONS, " or ".join(LOSS_AGGREGATIONS)),
    "grpo.scale_rewards": (lambda v: isinstance(v, bool), "True or False"),
    "grpo.max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "grpo.temperature": (lambda v: _real(v) and v > 0, "a number > 0 (rollouts must sample)"),
    "grpo.top_p": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "grpo.rewards": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty name:weight list"),
    "grpo.eval_prompts": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no reward eval)"),
    "distill.teacher": (lambda v: isinstance(v, str), "a workdir (DIR@STEP) or an HF directory"),
    "distill.mode": (lambda v: v in DISTILL_MODES, " or ".join(DISTILL_MODES)),
    "distill.num_prompts": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: every train prompt)"),
    "distill.max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "distill.teacher_temperature": (lambda v: _real(v) and v >= 0, "a number >= 0 (0: greedy)"),
    "distill.temperature": (lambda v: _real(v) and v > 0, "a number > 0"),
    "distill.alpha": (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "lora.rank": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no LoRA, train every weight)"),
    "lora.b_lr_ratio": (lambda v: _real(v) and v > 0, "a number > 0 (1: plain LoRA)"),
    "lora.init": (lambda v: v in models.lora.INITS, " or ".join(models.lora.INITS)),
    "lora.base_dtype": (lambda v: v in ("", "float32", "bfloat16"), "'' (the param dtype), float32 or bfloat16"),
}


def is_int(v) -> bool:
  """An int that is not a bool (JSON true/false and Python bools are ints to isinstance)."""
  return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _known_dataset(name) -> bool:
  try:
    sources.parse_dataset(name)
    return True
  except (ValueError, AttributeError, TypeError):
    return False


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def run_config_problems(config) -> list[str]:
  """Every out-of-range run field, as "<field> = <value>: must be <rule>" lines."""
  problems = []
  for path, (ok, rule) in _RULES.items():
    value = _get(config, path)
    if value is not _MISSING and not ok(value):
      problems.append(f"{path} = {value!r}: must be {rule}")
  if _get(config, "objective") == "sft" and _get(config, "data.dataset") != "sft_jsonl":
    problems.append(f"objective = 'sft' trains on completion tokens, which only data.dataset = 'sft_jsonl' marks "
                    f"(got {_get(config, 'data.dataset')!r})")
  objective = _get(config, "objective")
  if objective == "grpo" and not _get(config, "init_from"):
    problems.append("objective = 'grpo' improves a trained model: set init_from (a workdir or an HF directory)")
  if objective == "grpo" and _get(config, "lora.init") == "gradient" and is_int(_get(config, "lora.rank")) \
      and config.lora.rank > 0:
    problems.append("lora.init = 'gradient' needs a first training batch, which a grpo run does not have: use random")
  if objective == "distill" and not _get(config, "distill.teacher"):
    problems.append("objective = 'distill' needs distill.teacher (a workdir, DIR@STEP or an HF directory)")
  if objective == "distill" and _get(config, "distill.mode") == "sequence" \
      and _get(config, "data.dataset") == "sft_jsonl":
    problems.append("distill.mode = 'sequence' writes its own sft_jsonl data from the teacher; set data.dataset to "
                    "the prompt source (arithmetic, or data.prompt_files)")
  if objective in ("grpo", "distill") and _get(config, "data.prompt_template") is not _MISSING:
    template = _get(config, "data.prompt_template")
    if not isinstance(template, str) or template.count("{prompt}") != 1:
      problems.append(f"data.prompt_template = {template!r}: must contain {{prompt}} exactly once")
  if is_int(_get(config, "lora.rank")) and config.lora.rank > 0:
    try:
      models.lora.LoraConfig.from_dict(config.lora)
    except (ValueError, TypeError) as e:
      problems.append(f"lora: {e}")
  if "execution" in config:
    try:
      models.execution_from_dict(config.execution)
    except (ValueError, TypeError) as e:
      problems.append(f"execution: {e}")
  return problems


# --config.a.b=value or --config.a.b value (absl accepts both).
_OVERRIDE = re.compile(r"^--?(?P<flag>\w+)\.(?P<path>[\w.]+)(?:=.*)?$")


def unknown_overrides(argv: list[str], flag_name: str, config) -> list[str]:
  """Messages for `--<flag_name>.<path>` overrides naming a field `config` does not have, with the
  closest existing names at the level where the path leaves the config."""
  problems = []
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if not m or m.group("flag") != flag_name:
      continue
    node, walked = config, []
    for part in m.group("path").split("."):
      if not hasattr(node, "keys") or part not in node:
        choices = list(node.keys()) if hasattr(node, "keys") else []
        where = f"{flag_name}.{'.'.join(walked)}" if walked else flag_name
        close = difflib.get_close_matches(part, choices, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            f"; {where} has {', '.join(sorted(choices))}" if choices else f"; {where} is not a section"
        problems.append(f"--{flag_name}.{m.group('path')}: {where} has no field {part!r}{hint}")
        break
      node = node[part]
      walked.append(part)
  return problems


def _load_config_file(spec: str):
  """`path/to/config.py[:arg]` → its get_config(arg), as ml_collections' config flag loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_under_check", path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"{path} is not a Python config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flags_parser(flag_name: str = "config"):
  """An `app.run(flags_parser=...)` that first rejects overrides of fields the config file lacks,
  all of them in one message with close-match suggestions, instead of ml_collections' traceback."""

  def fail(message: str):  # the way absl reports any flag error: one message, exit status 1
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.exit(1)

  def parse(argv: list[str]):
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{flag_name}=")), None)
    if spec is not None:
      path = spec.partition(":")[0]
      if not os.path.isfile(path):
        fail(f"--{flag_name}={spec}: no config file {path!r}")
      try:
        config = _load_config_file(spec)
      except Exception as e:  # noqa: BLE001 - whatever the file raised, say it in one line
        fail(f"--{flag_name}={spec}: {type(e).__name__}: {e}")
      problems = unknown_overrides(argv[1:], flag_name, config)
      if problems:
        fail("unknown config fields:\n  " + "\n  ".join(problems))
    return app.parse_flags_with_usage(argv)

  return parse
