"""Rebuild a trained model for evaluation: from a training workdir or from an HF checkpoint directory.

  config, model, step = restore.load_workdir("/tmp/tiny")        # newest checkpoint; step=N picks one
  config, model, step = restore.load_hf("/path/deepseek-v3-dir")  # step 0; tokenizer.json beside it
  tok = restore.tokenizer_for(config)

A workdir holds `config.json` (the run config, written by the training loop; its `model` section is
`ModelConfig.to_dict()`) and orbax checkpoints in `checkpoints/<step>`. Workdirs written before the
`execution` section existed (execution fields inside `model`) read the same. Only the `params` and `router_bias` of the saved TrainState are read (a partial
restore: no optimizer moments, no data-iterator state), straight into the shardings the run's mesh
gives them, so a model restores on any device count its mesh config resolves to.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import sharding
from configs import common
from data import pipeline
from data import tokenizers
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


def _abstract_state(model_cfg: models.ModelConfig, mesh, rules) -> tuple[ModelDef, dict]:
  """The ModelDef and an abstract {params, router_bias, step} target carrying the mesh shardings."""
  modeldef = ModelDef.abstract(model_cfg)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

  def tree(template):
    shardings = nnx.to_pure_dict(sharding.state_shardings(template, mesh, rules))
    return jax.tree.map(with_sharding, nnx.to_pure_dict(template), shardings)

  target = {"params": tree(modeldef.params_template), "router_bias": tree(modeldef.bias_template),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
  return modeldef, target


def restore_params(checkpoint_dir: str, model_cfg: models.ModelConfig, mesh, *, step: int | None = None,
                   rules=None) -> tuple[models.Transformer, int]:
  """(model, step) from `checkpoint_dir/<step>` (default: the newest), params and router biases only."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), item_names=("state",), options=options)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {checkpoint_dir}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} (have {sorted(steps)})")
    modeldef, target = _abstract_state(model_cfg, mesh, rules)
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)  # skips opt_state
    state = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
  finally:
    manager.close()
  # A partial restore leaves every parameter the checkpoint lacks as its abstract placeholder: the
  # checkpoint holds another model than config.json describes.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if not isinstance(leaf, jax.Array)]
  if missing:
    raise models.CheckpointError(
        f"checkpoint {step} in {checkpoint_dir} lacks {len(missing)} of the parameters the run's config "
        f"describes (e.g. {', '.join(missing[:3])}): it holds a different model")
  return modeldef.merge(state["params"], state["router_bias"]), int(step)


def load_workdir(workdir: str, *, step: int | None = None, mesh=None
                 ) -> tuple[ml_collections.ConfigDict, models.Transformer, int]:
  """(run config, trained model, checkpoint step) of a training workdir."""
  config = read_config(workdir)
  model_cfg = models.from_dict(config.model.to_dict())
  mesh = eval_mesh(config) if mesh is None else mesh
  model, step = restore_params(os.path.join(workdir, "checkpoints"), model_cfg, mesh, step=step,
                               rules=config.get("sharding_rules"))
  return config, model, step


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
