"""Model weights from where they live: a training workdir's checkpoints or an HF DeepSeek directory.

  source = weights.parse_source("/tmp/tiny@400")          # a workdir (newest step without @), or an HF dir
  model_cfg = weights.source_model_config(source, config.model.to_dict())
  params, bias = weights.load_source_weights(source, ModelDef.abstract(model_cfg), mesh)   # on the mesh
  model_cfg, params, bias, step = weights.load_workdir_weights("/tmp/sft", mesh)   # LoRA runs: merged

A workdir checkpoint is read partially: only the `params` and `router_bias` of the saved TrainState (no
optimizer moments, no data-iterator state), straight into the shardings the mesh gives them. The
checkpoint of a LoRA run holds only its adapters; its base is the run's `init_from`, loaded again and
merged (W + scale·A·B) here. `config.init_from` (training/init.py) and eval.py both read through this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import sharding
from data import pipeline
from data import tokenizers
from models import lora
from training import adapters
from training import workdir as workdir_lib
from training.state import ModelDef, split_model

DTYPE_FIELDS = ("dtype", "param_dtype")  # the model fields a run may set differently from its init_from


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a run's initial weights come from: a training workdir (at `step`, None = newest) or an HF
  DeepSeek checkpoint directory."""
  kind: str  # "workdir" | "hf"
  path: str
  step: int | None = None

  def __str__(self) -> str:
    return self.path if self.step is None else f"{self.path}@{self.step}"


def parse_source(spec: str) -> Source:
  """`DIR` or `DIR@STEP` → Source. A directory with a train.py config.json (a `model` section) is a
  workdir, one with an HF config.json an HF checkpoint. Raises ValueError saying what is wrong."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"init_from must name a workdir or an HF checkpoint directory, got {spec!r}")
  path, step = spec, None
  if not os.path.isdir(spec) and "@" in spec:
    path, _, step_text = spec.rpartition("@")
    if not step_text.isdigit():
      raise ValueError(f"init_from {spec!r}: the part after @ must be a checkpoint step, got {step_text!r}")
    step = int(step_text)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ValueError(f"init_from {spec!r}: {path} is not a directory")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"init_from {spec!r}: {path} has no config.json (neither a training workdir nor an HF "
                     "checkpoint directory)")
  try:
    with open(config_path) as f:
      raw = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"init_from {spec!r}: {config_path} is not valid JSON ({e})") from None
  if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
    steps = workdir_lib.checkpoint_steps(path)
    if not steps:
      raise ValueError(f"init_from {spec!r}: the workdir {path} has no checkpoints")
    if step is not None and step not in steps:
      raise ValueError(f"init_from {spec!r}: {path} has no checkpoint {step} (it has {steps})")
    return Source("workdir", path, step)
  if step is not None:
    raise ValueError(f"init_from {spec!r}: {path} is an HF checkpoint directory, which has no steps")
  return Source("hf", path)


def source_model_config(source: Source, model_section: dict) -> models.ModelConfig:
  """The source's architecture, with the run's dtype/param_dtype when it sets them (None = the source's;
  an HF directory's default is float32). Any other model field the run sets must equal the source's,
  else ValueError naming each field that differs."""
  section = {k: v for k, v in (model_section or {}).items() if v is not None}
  dtypes = {k: section.pop(k) for k in DTYPE_FIELDS if k in section}
  if source.kind == "hf":
    dtype = dtypes.get("dtype", "float32")
    cfg = models.hf_model_config(source.path, dtype=jnp.dtype(dtype),
                                 param_dtype=jnp.dtype(dtypes.get("param_dtype", dtype)))
  else:
    cfg = models.from_dict(workdir_lib.read_run_config(source.path).model.to_dict()).replace(**dtypes)
  try:
    wanted = models.from_dict({**cfg.to_dict(), **section})
  except (ValueError, TypeError) as e:
    raise ValueError(f"model: {e}") from None
  differences = [f"model.{name} = {getattr(wanted, name)!r}, but {source} has {getattr(cfg, name)!r}"
                 for name in models.ModelConfig.__dataclass_fields__ if getattr(wanted, name) != getattr(cfg, name)]
  if differences:
    raise ValueError("the architecture comes from init_from; the config disagrees with it: "
                     + "; ".join(differences) + f" (leave these fields out; only {' and '.join(DTYPE_FIELDS)} "
                     "may differ)")
  return cfg


def tokenizer_problems(source: Source, tokenizer: tokenizers.Tokenizer) -> list[str]:
  """How the run's tokenizer differs from the one the source was trained with (vocabulary size and
  special ids for a workdir; the BOS/EOS ids of an HF config.json)."""
  if source.kind == "workdir":
    theirs = pipeline.make_tokenizer(workdir_lib.read_run_config(source.path).data)
    pairs = [("vocabulary size", tokenizer.vocab_size, theirs.vocab_size), ("EOS id", tokenizer.eos_id, theirs.eos_id),
             ("BOS id", tokenizer.bos_id, theirs.bos_id), ("pad id", tokenizer.pad_id, theirs.pad_id)]
    return [f"the run's tokenizer has {what} {ours}, but {source} was trained with {theirs}"
            for what, ours, theirs in pairs if ours != theirs]
  hf = models.hf.read_hf_config(source.path)
  pairs = [("BOS", "bos_token_id", tokenizer.bos_id), ("EOS", "eos_token_id", tokenizer.eos_id)]
  return [f"the run's tokenizer has {what} id {ours}, but {source}/config.json has {key} {hf[key]}"
          for what, key, ours in pairs if hf.get(key) is not None and hf[key] != ours]


def _with_shardings(template, mesh, rules) -> dict:
  """Pure dict of ShapeDtypeStructs carrying the NamedShardings of an nnx state template."""
  shardings = nnx.to_pure_dict(sharding.state_shardings(template, mesh, rules))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nnx.to_pure_dict(template), shardings)


@contextlib.contextmanager
def _orbax_quiet():
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.ERROR))
  try:
    yield
  finally:
    logging.set_verbosity(level)


def restore_items(checkpoint_dir: str, target: dict, *, step: int | None = None) -> tuple[dict, int]:
  """({name: tree} of the saved TrainState fields named in `target`, step) from `checkpoint_dir/<step>`
  (default: the newest). `target` holds ShapeDtypeStructs with shardings; the rest is skipped."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with _orbax_quiet():  # orbax warns that a read-only manager's directory is read-only
    manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), item_names=("state",), options=options)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {checkpoint_dir}")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} (have {sorted(steps)})")
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    state = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
  finally:
    manager.close()
  # A partial restore leaves every leaf the checkpoint lacks as its abstract placeholder: the
  # checkpoint holds another model than the config describes.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if not isinstance(leaf, jax.Array)]
  if missing:
    raise models.CheckpointError(
        f"checkpoint {step} in {checkpoint_dir} lacks {len(missing)} of the parameters the run's config "
        f"describes (e.g. {', '.join(missing[:3])}): it holds a different model")
  return state, int(step)


def load_workdir_weights(workdir: str, mesh, *, step: int | None = None, rules=None,
                         modeldef: ModelDef | None = None) -> tuple[models.ModelConfig, dict, dict, int]:
  """(model config, params, router_bias, step) of a workdir's checkpoint, laid out on `mesh`. A LoRA
  run's adapters come back merged into its base. modeldef: the model to read it as (default the
  config.json's; its config may differ in dtypes: the weights are cast to its param_dtype). Build it
  outside `jax.set_mesh`, as `ModelDef.abstract` needs."""
  config = workdir_lib.read_run_config(workdir)
  if modeldef is None:
    modeldef = ModelDef.abstract(models.from_dict(config.model.to_dict()))
  model_cfg = modeldef.cfg
  target = {"router_bias": _with_shardings(modeldef.bias_template, mesh, rules),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
  lora_cfg = adapters.lora_config(config)
  if lora_cfg is None:
    target["params"] = _with_shardings(modeldef.params_template, mesh, rules)
    state, step = restore_items(os.path.join(workdir, "checkpoints"), target, step=step)
    return model_cfg, state["params"], state["router_bias"], step
  plan = lora.plan(modeldef.params_template, lora_cfg)
  target["params"] = adapters.abstract_adapters(plan, mesh, rules)
  state, step = restore_items(os.path.join(workdir, "checkpoints"), target, step=step)
  base, _ = load_source_weights(parse_source(config.init_from), modeldef, mesh, rules)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(modeldef.params_template, mesh, rules))
  merge = jax.jit(functools.partial(lora.merge, cfg=lora_cfg), out_shardings=param_shardings)
  return model_cfg, merge(base, state["params"]), state["router_bias"], step


def load_source_weights(source: Source, modeldef: ModelDef, mesh, rules=None) -> tuple[dict, dict]:
  """(params, router_bias) pure dicts of `source` as `modeldef` (its architecture, the run's dtypes)
  describes them, laid out on `mesh`."""
  if source.kind == "workdir":
    _, params, bias, _ = load_workdir_weights(source.path, mesh, step=source.step, rules=rules, modeldef=modeldef)
    return params, bias
  cfg = modeldef.cfg
  _, params, bias = split_model(models.load_hf_checkpoint(source.path, dtype=cfg.dtype, param_dtype=cfg.param_dtype))
  place = lambda template, tree: jax.device_put(tree, nnx.to_pure_dict(sharding.state_shardings(template, mesh, rules)))
  return place(modeldef.params_template, params), place(modeldef.bias_template, bias)


def write_weights_workdir(out: str, config, model_cfg: models.ModelConfig, params: dict, router_bias: dict,
                          step: int) -> str:
  """A workdir holding only these weights (config.json + checkpoints/<step>, no optimizer state): what
  eval.py and `init_from` read. The config is the run's, as a full-weight run (no LoRA, no init_from)."""
  if os.path.exists(out) and os.listdir(out):
    raise ValueError(f"{out} exists and is not empty; choose a new directory")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = model_cfg.to_dict()
    config.init_from = ""
    if "lora" in config:
      config.lora.rank = 0
  os.makedirs(out, exist_ok=True)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(out), "checkpoints"), item_names=("state",))
  state = {"step": jnp.asarray(step, jnp.int32), "params": params, "router_bias": router_bias}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(out, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  return os.path.join(out, "checkpoints", str(step))
