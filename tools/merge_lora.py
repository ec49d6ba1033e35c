"""Merge a LoRA run's adapters into its base weights (W + alpha/rank · A·B) and write full weights.

  python -m tools.merge_lora --workdir=/tmp/tiny_lora --out=/tmp/tiny_merged        # a workdir checkpoint
  python -m tools.merge_lora --workdir=/tmp/tiny_lora --out=/tmp/tiny_hf --hf       # an HF directory

The workdir output holds config.json and checkpoints/<step> with params and router biases only (no
optimizer state): `eval.py --workdir=OUT` evaluates it and `--config.init_from=OUT` trains on from it.
The HF output is `models.save_hf_checkpoint`'s float32 safetensors + config.json, with the run's HF
tokenizer files copied beside them when it used one. --step picks a checkpoint (default: the newest).
"""

import os
import shutil
import sys

from absl import app, flags, logging

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def merge(workdir: str, out: str, *, step: int | None = None, hf: bool = False) -> str:
  """Writes the merged weights of `workdir` to `out`; returns what it wrote."""
  from evaluation import restore
  import models
  from training import adapters, weights
  from training.state import ModelDef

  config = restore.read_config(workdir)
  if adapters.lora_config(config) is None:
    raise ValueError(f"{workdir} is not a LoRA run (its config.json has lora.rank = 0): its checkpoints "
                     "already hold full weights")
  if os.path.exists(out) and os.listdir(out):
    raise ValueError(f"{out} exists and is not empty; choose a new directory")
  mesh = restore.eval_mesh(config)
  model_cfg, params, bias, step = weights.load_workdir_weights(workdir, mesh, step=step,
                                                               rules=config.get("sharding_rules"))
  if not hf:
    return weights.write_weights_workdir(out, config, model_cfg, params, bias, step)
  models.save_hf_checkpoint(ModelDef.abstract(model_cfg).merge(params, bias), out)
  if config.data.get("tokenizer") == "hf":
    path = config.data.tokenizer_path
    source_dir = path if os.path.isdir(path) else os.path.dirname(path)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source_dir, name)):
        shutil.copy(os.path.join(source_dir, name), os.path.join(out, name))
  return out


def define_flags() -> None:
  """The command line's flags, defined only when run as a program: importing `merge` (tests do) must
  not add required flags to the process's absl flags."""
  flags.DEFINE_string("workdir", None, "The LoRA run's workdir.", required=True)
  flags.DEFINE_string("out", None, "Where the merged weights go (a new or empty directory).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to merge (default: the newest).")
  flags.DEFINE_bool("hf", False, "Write an HF DeepSeek directory instead of a workdir checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines would bury the one line this prints
  try:
    written = merge(f.workdir, f.out, step=f.step, hf=f.hf)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"merge_lora: {e}")
  print(f"wrote merged weights to {written}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
