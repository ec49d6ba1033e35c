"""Distillation into a student (objective = distill): from a frozen teacher's completions or its logits.

`config.distill.mode`:
- `sequence` (the DeepSeek-R1 recipe for its dense models): before the first step, the teacher completes
  the run's prompts (data/prompts.py: arithmetic problems or prompt_files; `num_prompts`, greedy unless
  `teacher_temperature` > 0) with the project's `generate`; the lines {"prompt", "completion", "answer"}
  are written once to WORKDIR/distill/teacher.jsonl (atomically) and reused on resume. The student is then
  trained on them exactly as supervised fine-tuning trains (data/sft.py: loss on the completions only,
  ~5 % held out for eval/loss).
- `logits`: each step also runs the teacher on the batch, and the loss is
  alpha · τ² · KL(teacher_τ ‖ student_τ) + (1 − alpha) · CE, where _τ is the softmax at temperature τ and
  both terms are means over the same target tokens (training/step.py).

The student is the run's own model config (typically dense and smaller); the teacher (a workdir or an HF
directory) keeps its own architecture and must share the student's tokenizer (checked before anything
compiles, training/validate.py) and vocabulary size.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

import models
from data import prompts as prompts_lib
from data import tokenizers
from training import rollout
from training import weights
from training.state import ModelDef

GENERATION_BATCH = 256  # prompts per teacher generate call


def is_sequence(config) -> bool:
  return config.get("objective", "pretrain") == "distill" and config.distill.mode == "sequence"


def is_logits(config) -> bool:
  return config.get("objective", "pretrain") == "distill" and config.distill.mode == "logits"


def data_path(workdir: str) -> str:
  return os.path.join(workdir, "distill", "teacher.jsonl")


def student_data_config(config, workdir: str):
  """The data section the student trains on in sequence mode: the teacher's lines as sft_jsonl."""
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.dataset = "sft_jsonl"
    data.sft_files = data_path(workdir)
    data.sft_eval_files = ""
    data.chat_template = "project"  # prompt/completion lines: the rendered prompt is the prompt
  return data


def teacher_model(config, mesh) -> tuple[ModelDef, dict, dict]:
  """(ModelDef, params, router_bias) of the frozen teacher on `mesh`."""
  source = weights.parse_source(config.distill.teacher)
  teacher_cfg = weights.source_model_config(source, {})
  modeldef = ModelDef.abstract(teacher_cfg)
  params, bias = weights.load_source_weights(source, modeldef, mesh, config.get("sharding_rules"))
  return modeldef, params, bias


def check_vocab(student_cfg: models.ModelConfig, teacher_cfg: models.ModelConfig) -> None:
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise ValueError(f"distill: the student's vocab_size {student_cfg.vocab_size} differs from the teacher's "
                     f"{teacher_cfg.vocab_size}; logits distillation compares them token for token")


def write_teacher_data(config, workdir: str, tokenizer: tokenizers.Tokenizer, mesh, execution) -> str:
  """WORKDIR/distill/teacher.jsonl: the teacher's completion of every prompt (see the module docstring).
  An existing file is reused (it is only ever written whole)."""
  path = data_path(workdir)
  if os.path.exists(path):
    logging.info("distill: reusing the teacher's completions in %s", path)
    return path
  d = config.distill
  records = prompts_lib.load_prompts(config.data, "train", int(d.num_prompts) or None)
  template = config.data.get("prompt_template", prompts_lib.DEFAULT_TEMPLATE)
  prompts = rollout.encode_prompts(records, tokenizer, template)
  modeldef, params, bias = teacher_model(config, mesh)
  lines = []
  with jax.set_mesh(mesh):
    teacher = modeldef.merge(params, bias)
    for start in range(0, len(prompts), GENERATION_BATCH):
      chunk = np.arange(start, min(start + GENERATION_BATCH, len(prompts)))
      indices = np.concatenate([chunk, np.full(GENERATION_BATCH - len(chunk), chunk[0])])  # one shape
      out = rollout.sample(teacher, prompts, indices, tokenizer, max_new_tokens=int(d.max_new_tokens),
                           temperature=float(d.teacher_temperature),
                           key=jax.random.fold_in(jax.random.key(config.seed), start), execution=execution)
      for i, completion in zip(chunk, out.completions):
        lines.append({"prompt": prompts.texts[i], "completion": completion, "answer": records[i].get("answer", "")})
  kept = [line for line in lines if line["completion"].strip()]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for line in kept:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)
  print(f"distill: the teacher completed {len(lines)} prompts ({len(lines) - len(kept)} empty completions dropped) "
        f"into {path}", flush=True)
  return path
