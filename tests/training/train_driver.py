"""train.py with test hooks, chosen by the JSON object in $TRAIN_TEST_HOOK:

  {"kill_after_save": N}        SIGKILL this process as soon as checkpoint N is complete (a crash).
  {"pause_at_log": N, "ready": PATH, "go": PATH}
                                after step N's train metrics are written, create `ready` and wait
                                (at most 120 s) until `go` exists, so a test can signal the process
                                at a known step.

  TRAIN_TEST_HOOK='{"kill_after_save": 3}' python tests/training/train_driver.py --config=... --workdir=...
"""

import json
import os
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from absl import app, flags  # noqa: E402

import train  # noqa: E402  (defines the flags)
from training import checkpoint, metrics  # noqa: E402


def install(hook: dict) -> None:
  if "kill_after_save" in hook:
    target, save = hook["kill_after_save"], checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
      out = save(self, step, *args, **kwargs)
      if step == target:
        self.wait()
        print(f"HOOK: SIGKILL after checkpoint {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return out

    checkpoint.Checkpointer.save = save_then_die

  if "pause_at_log" in hook:
    target, write = hook["pause_at_log"], metrics.MetricsWriter.write

    def write_then_pause(self, step, values):
      out = write(self, step, values)
      if step == target and "train/loss" in values:
        pathlib.Path(hook["ready"]).touch()
        deadline = time.monotonic() + 120
        while not os.path.exists(hook["go"]) and time.monotonic() < deadline:
          time.sleep(0.05)
        print(f"HOOK: resumed after pausing at step {step}", flush=True)
      return out

    metrics.MetricsWriter.write = write_then_pause


if __name__ == "__main__":
  install(json.loads(os.environ.get("TRAIN_TEST_HOOK", "{}")))
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(train.main)
