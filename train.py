"""Train a DeepSeek-style model.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python train.py --config=configs/tiny.py --workdir=/tmp/tiny --config.total_steps=100 --config.mesh.expert=2

Reruns of the same command resume from the newest checkpoint in --workdir (one run per workdir; its
config.json fixes the model and tokenizer; --start_over moves an earlier run's records aside). The
console shows the run's own lines; `--verbosity=0` adds every library's INFO logs, `--log_dir=DIR`
writes them to files. Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS etc.).
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_START_OVER = flags.DEFINE_bool("start_over", False, "Start a fresh run in a workdir that holds another "
                                "run's records, moving them to WORKDIR/previous-<time>/ (never deleted).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax, grain and absl INFO lines would bury the progress
  if _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  print(f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices", flush=True)
  from training import loop  # after distributed init
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)


if __name__ == "__main__":
  from training import config_check

  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=config_check.flags_parser("config"))
