"""Checks a run config before anything compiles, with one clear error per mistake."""

from __future__ import annotations

import os
import tempfile

import jax

import models
import sharding
from training import config_check, memory


def validate_run(config, workdir: str) -> tuple[models.ModelConfig, jax.sharding.Mesh, models.Execution]:
  """(model config, mesh, execution) of a valid run. Raises one ValueError listing every problem found
  in the run fields, the model, the mesh and the execution, before anything is built."""
  problems = config_check.run_config_problems(config)
  try:
    model_cfg = models.from_dict(config.model.to_dict())
  except (ValueError, TypeError) as e:
    problems.append(f"model: {e}")
    model_cfg = None
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
  if problems:
    raise ValueError("invalid run config:\n  " + "\n  ".join(problems))
  _check_workdir(workdir)
  memory.check_fits(memory.plan_memory(config, model_cfg, dict(mesh.shape)), memory.device_memory_bytes())
  return model_cfg, mesh, execution


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None
