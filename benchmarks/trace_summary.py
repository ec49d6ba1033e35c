"""Summarises a perfetto/Chrome trace written by `jax.profiler.trace(..., create_perfetto_trace=True)`.

  python -m benchmarks.trace_summary PATH/perfetto_trace.json.gz [--top=25] [--device=GPU]

Sums the duration of complete events ("X") per name on the accelerator's processes (those whose
process name contains --device) and prints the largest with their share of the summed device time.
XLA names GPU kernels after their fusions, so the rows point at the HLO that costs most. A second
table sums them by class (CLASSES: grouped matmul, dense matmul, attention, copies, other fusions).
"""

from __future__ import annotations

import collections
import gzip
import json
import re

from absl import app, flags

_TOP = flags.DEFINE_integer("top", 25, "Rows to print.")
_DEVICE = flags.DEFINE_string("device", "GPU", "Substring of the accelerator processes' names.")


def load_events(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_time_by_name(events: list[dict], device: str) -> tuple[collections.Counter, float, float]:
  """(microseconds per event name, summed microseconds, wall span in microseconds) on device processes."""
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
  pids = {pid for pid, name in names.items() if device.lower() in str(name).lower()}
  per_name = collections.Counter()
  starts, ends = [], []
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e:
      per_name[e["name"]] += float(e["dur"])
      starts.append(float(e["ts"]))
      ends.append(float(e["ts"]) + float(e["dur"]))
  if not per_name:
    raise ValueError(f"no complete events on processes matching {device!r}; processes: {sorted(set(names.values()))}")
  return per_name, sum(per_name.values()), max(ends) - min(starts)


# First match wins; kernel names as XLA, cuBLAS (nvjet), cuDNN and Pallas/tokamax name them.
CLASSES = (("grouped matmul (MoE experts)", r"grouped_product|grouped_weight_gradient|ragged_"),
           ("dense matmul", r"nvjet|gemm|cublas|xmma|cutlass|matmul|dot"),
           ("attention", r"cudnn|sdpa|flash|attention"),
           ("copies", r"memcpy|memset|copy"),
           ("other fusions", r""))


def by_class(per_name: collections.Counter) -> collections.Counter:
  """Microseconds per op class (CLASSES)."""
  out = collections.Counter()
  for name, us in per_name.items():
    out[next(label for label, pattern in CLASSES if re.search(pattern, name, re.IGNORECASE))] += us
  return out


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m benchmarks.trace_summary TRACE.json[.gz]")
  per_name, total, span = device_time_by_name(load_events(argv[1]), _DEVICE.value)
  print(f"device time {total / 1e3:.1f} ms summed over {len(per_name)} names; first-to-last span {span / 1e3:.1f} ms")
  print("| ms | share | name |\n|---|---|---|")
  for name, us in per_name.most_common(_TOP.value):
    print(f"| {us / 1e3:.2f} | {us / total:.1%} | {name[:110]} |")
  print("\n| ms | share | op class |\n|---|---|---|")
  for label, us in by_class(per_name).most_common():
    print(f"| {us / 1e3:.2f} | {us / total:.1%} | {label} |")


if __name__ == "__main__":
  app.run(main)
