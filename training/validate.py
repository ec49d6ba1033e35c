"""Checks a run config before anything compiles, with one clear error per mistake."""

from __future__ import annotations

import os
import tempfile

import jax

import models
import sharding
from training import memory


def validate_run(config, model_cfg: models.ModelConfig, workdir: str) -> tuple[jax.sharding.Mesh, models.Execution]:
  """Returns the mesh and the run's execution on it. Raises ValueError naming the problem for an
  invalid run."""
  if config.seq_len > model_cfg.max_position_embeddings:
    raise ValueError(f"seq_len {config.seq_len} exceeds the model's max_position_embeddings "
                     f"{model_cfg.max_position_embeddings}")
  if config.seq_len < 3:
    raise ValueError(f"seq_len must be at least 3, got {config.seq_len}")
  if config.total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {config.total_steps}")
  for name in ("log_every", "checkpoint_every"):
    if config[name] < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
                     f"{config.grad_accum_steps}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {jax.process_count()} processes")
  mesh = sharding.make_mesh(config.mesh)
  rules = config.get("sharding_rules")
  sharding.validate(model_cfg, mesh, rules=rules)
  execution = sharding.make_execution(config.get("execution"), mesh, rules)
  execution.check(model_cfg, platform=mesh.devices.flat[0].platform)
  batch_shards = sharding.batch_shards(mesh, rules)
  micro = config.batch_size // config.grad_accum_steps
  if micro % batch_shards:
    raise ValueError(f"the microbatch of {micro} sequences does not split over the {batch_shards} batch "
                     f"shards ({' x '.join(sharding.batch_axes(rules))}) of the mesh {dict(mesh.shape)}")
  _check_workdir(workdir)
  memory.check_fits(memory.plan_memory(config, model_cfg, dict(mesh.shape)), memory.device_memory_bytes())
  return mesh, execution


def _check_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None
