"""Rebuild a trained model for evaluation: from a training workdir or from an HF checkpoint directory.

  config, model, step = restore.load_workdir("/tmp/tiny")        # newest checkpoint; step=N picks one
  config, model, step = restore.load_hf("/path/deepseek-v3-dir")  # step 0; tokenizer.json beside it
  tok = restore.tokenizer_for(config)

A workdir holds `config.json` (the run config, written by the training loop; its `model` section is
`ModelConfig.to_dict()`) and orbax checkpoints in `checkpoints/<step>`. Workdirs written before the
`execution` section existed (execution fields inside `model`) read the same. The weights come through
`training.weights` (params and router biases only, straight into the shardings of the run's mesh, so a
model restores on any device count its mesh config resolves to; a LoRA run's adapters merged into its
base).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

import models
import sharding
from configs import common
from data import pipeline
from data import tokenizers
from training import weights
from training import workdir as workdir_lib
from training.state import ModelDef

read_config = workdir_lib.read_run_config  # WORKDIR/config.json as a run ConfigDict (old layouts too)


def eval_mesh(config) -> jax.sharding.Mesh:
  """The run's mesh on this machine. If its fixed axis sizes do not fit the devices here (say a run
  trained on 8 chips is evaluated on 1), or the eval batch does not split over its batch axes, the
  data axis takes the most devices that divide the batch (the rest stay idle)."""
  try:
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.batch_shards(mesh, config.get("sharding_rules"))
    if config.batch_size % shards == 0:
      return mesh
    reason = f"batch {config.batch_size} does not split over {shards} batch shards"
  except ValueError as e:
    reason = str(e)
  n = max(d for d in range(1, jax.device_count() + 1)
          if config.batch_size % d == 0 and jax.device_count() % d == 0)
  logging.warning("the run's mesh %s does not fit here (%s); using data=%d", dict(config.mesh), reason, n)
  return sharding.make_mesh({"data": n}, devices=jax.devices()[:n])


def eval_execution(config, mesh) -> models.Execution:
  """The run's execution on the eval mesh; cuDNN attention falls back to the XLA reference off GPUs."""
  execution = sharding.make_execution(config.get("execution"), mesh, config.get("sharding_rules"))
  platform = mesh.devices.flat[0].platform
  if execution.attention_impl == "cudnn" and platform != "gpu":
    logging.warning("the run used cuDNN attention; evaluating on %s with the XLA reference", platform)
    execution = execution.replace(attention_impl="xla")
  return execution


def load_workdir(workdir: str, *, step: int | None = None, mesh=None, dtype=None
                 ) -> tuple[ml_collections.ConfigDict, models.Transformer, int]:
  """(run config, trained model, checkpoint step) of a training workdir; dtype: a compute dtype other
  than the run's (the weights keep their stored dtype)."""
  config = read_config(workdir)
  mesh = eval_mesh(config) if mesh is None else mesh
  model_cfg, params, bias, step = weights.load_workdir_weights(workdir, mesh, step=step,
                                                               rules=config.get("sharding_rules"))
  if dtype is not None:
    model_cfg = dataclasses.replace(model_cfg, dtype=jnp.dtype(dtype))
  return config, ModelDef.abstract(model_cfg).merge(params, bias), step


def load_hf(hf_dir: str, *, dtype="float32", seq_len: int = 256, batch_size: int = 16, eval_batches: int = 16,
            data_dir: str = "", mesh=None) -> tuple[ml_collections.ConfigDict, models.Transformer, int]:
  """(run config, model, 0) for an HF DeepSeek-V2/V3 checkpoint directory with its `tokenizer.json`.

  The run config is the defaults of configs/common.py around the checkpoint's architecture, with the
  HF tokenizer and the embedded stdlib corpus for evaluation, and the given eval shape.
  """
  if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    raise FileNotFoundError(f"{hf_dir} has no tokenizer.json (needed to tokenize eval data and prompts)")
  model = models.load_hf_checkpoint(hf_dir, dtype=jnp.dtype(dtype))
  config = common.run_config(model.cfg.to_dict(), seq_len=min(seq_len, model.cfg.max_position_embeddings),
                             batch_size=batch_size, eval_batches=eval_batches)
  config.data.update(tokenizer="hf", tokenizer_path=os.path.abspath(hf_dir), data_dir=data_dir)
  mesh = eval_mesh(config) if mesh is None else mesh
  state = nnx.state(model)  # loaded onto one device: lay it out on the mesh like a restored run
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, config.get("sharding_rules"))))
  return config, model, 0


def tokenizer_for(config) -> tokenizers.Tokenizer:
  """The tokenizer the run trained with (config.data.tokenizer / tokenizer_path)."""
  return pipeline.make_tokenizer(config.data)
