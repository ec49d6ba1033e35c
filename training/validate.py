"""Checks a run config before anything compiles, with one clear error per mistake."""

from __future__ import annotations

import os
import tempfile

import jax

import models
import sharding
from data import pipeline
from models import lora
from training import adapters, config_check, grpo_trainer, memory, weights
from training.state import ModelDef


def validate_run(config, workdir: str) -> tuple[models.ModelConfig, jax.sharding.Mesh, models.Execution]:
  """(model config, mesh, execution) of a valid run. Raises one ValueError listing every problem found
  in the run fields, the model, the mesh and the execution, before anything is built."""
  problems = config_check.run_config_problems(config)
  model_cfg = _model_config(config, problems)
  if model_cfg is not None and config_check.is_int(config.seq_len) and config.seq_len > model_cfg.max_position_embeddings:
    problems.append(f"seq_len {config.seq_len} exceeds the model's max_position_embeddings "
                    f"{model_cfg.max_position_embeddings}")
  if config_check.is_int(config.batch_size) and config_check.is_int(config.grad_accum_steps) and config.grad_accum_steps >= 1 \
      and config.batch_size % config.grad_accum_steps:
    problems.append(f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
                    f"{config.grad_accum_steps}")
  if config_check.is_int(config.batch_size) and config.batch_size % jax.process_count():
    problems.append(f"batch_size {config.batch_size} is not divisible by the {jax.process_count()} processes")
  mesh = execution = None
  rules = config.get("sharding_rules")
  try:
    mesh = sharding.make_mesh(config.mesh)
    if model_cfg is not None:
      sharding.validate(model_cfg, mesh, rules=rules)
  except ValueError as e:
    problems.append(str(e))
  if mesh is not None and model_cfg is not None and not any(p.startswith("execution") for p in problems):
    try:
      execution = sharding.make_execution(config.get("execution"), mesh, rules)
      execution.check(model_cfg, platform=mesh.devices.flat[0].platform)
    except ValueError as e:
      problems.append(f"execution: {e}")
  if mesh is not None and not problems:
    batch_shards = sharding.batch_shards(mesh, rules)
    micro = config.batch_size // config.grad_accum_steps
    if micro % batch_shards:
      problems.append(f"the microbatch of {micro} sequences does not split over the {batch_shards} batch "
                      f"shards ({' x '.join(sharding.batch_axes(rules))}) of the mesh {dict(mesh.shape)}")
  if mesh is not None and not problems and config.get("objective") == "grpo":
    problems.extend(grpo_trainer.config_problems(config, sharding.batch_shards(mesh, rules)))
  if config.get("objective") == "distill" and config.distill.get("teacher"):
    problems.extend(_teacher_problems(config))
  if problems:
    raise ValueError("invalid run config:\n  " + "\n  ".join(problems))
  _check_workdir(workdir)
  memory.check_fits(memory.plan_memory(config, model_cfg, dict(mesh.shape)), memory.device_memory_bytes())
  return model_cfg, mesh, execution


def _model_config(config, problems: list[str]) -> models.ModelConfig | None:
  """The run's architecture: the model section, or `init_from`'s (whose tokenizer must match the run's).
  Appends what is wrong to `problems`."""
  try:
    if not config.get("init_from"):
      if config.get("lora") and config.lora.get("rank"):
        problems.append("lora.rank > 0 needs init_from: the base weights the adapters train on")
      return models.from_dict(config.model.to_dict())
    source = weights.parse_source(config.init_from)
    model_cfg = weights.source_model_config(source, config.model.to_dict())
  except (ValueError, TypeError, models.CheckpointError) as e:
    problems.append(str(e) if config.get("init_from") else f"model: {e}")
    return None
  try:
    problems.extend(f"init_from: {p}" for p in weights.tokenizer_problems(source, pipeline.make_tokenizer(config.data)))
  except ValueError as e:  # the run's or the source's tokenizer cannot be built
    problems.append(f"init_from: comparing tokenizers: {e}")
  lora_cfg = None
  try:
    lora_cfg = adapters.lora_config(config)
  except (ValueError, TypeError):
    pass  # reported by config_check
  if lora_cfg is not None:
    try:
      lora.plan(ModelDef.abstract(model_cfg).params_template, lora_cfg)
    except ValueError as e:  # a targets regex that matches no weight of this model
      problems.append(f"lora: {e}")
  return model_cfg


def _teacher_problems(config) -> list[str]:
  """A distillation teacher must exist and share the student's tokenizer (vocab size and special ids)."""
  try:
    source = weights.parse_source(config.distill.teacher)
    return [f"distill.teacher: {p}" for p in weights.tokenizer_problems(source, pipeline.make_tokenizer(config.data))]
  except (ValueError, models.CheckpointError) as e:
    return [f"distill.teacher: {e}"]


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None
