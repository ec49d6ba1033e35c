"""Plot a run's loss curves and expert load from WORKDIR/metrics.jsonl to PNG files.

  python -m tools.plot_metrics --workdir=/tmp/tiny   # writes loss.png and expert_load.png there
"""

from __future__ import annotations

import json
import os
import re

from absl import app, flags



def read_metrics(path: str) -> dict[int, dict]:
  """step → merged metrics; a step logged twice (e.g. re-run after a resume) keeps the latest values."""
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
  return dict(sorted(by_step.items()))


def series(rows: dict[int, dict], key: str):
  steps = [s for s, r in rows.items() if key in r]
  return steps, [rows[s][key] for s in steps]


def plot(workdir: str, out_dir: str | None = None) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = out_dir or workdir
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  written = []
  fig, ax = plt.subplots(figsize=(7, 4))
  for key in ("train/loss", "train/ce", "train/mtp_ce", "eval/loss"):
    steps, values = series(rows, key)
    if steps:
      ax.plot(steps, values, marker="o" if key.startswith("eval") else None, label=key)
  steps, bpb = series(rows, "eval/bits_per_byte")
  if steps:
    ax2 = ax.twinx()
    ax2.plot(steps, bpb, "k--", marker="s", label="eval/bits_per_byte")
    ax2.set_ylabel("bits per byte")
    ax2.legend(loc="upper center")
  ax.set_xlabel("step")
  ax.set_ylabel("nats per token")
  ax.legend(loc="upper right")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  written.append(os.path.join(out_dir, "loss.png"))
  fig.savefig(written[-1], dpi=110)
  plt.close(fig)

  keys = sorted({k for r in rows.values() for k in r if re.match(r"moe/.*/load_max$", k)})
  if keys:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
      steps, values = series(rows, key)
      ax.plot(steps, values, label=key.removeprefix("moe/").removesuffix("/load_max"))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max expert load / balanced load")
    ax.set_title("expert load (1.0 = perfectly balanced)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "expert_load.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  return written


def main(argv):
  del argv
  for path in plot(flags.FLAGS.workdir, flags.FLAGS.out):
    print(path)


if __name__ == "__main__":
  # Flags are defined only when run as a command, so importing plot() defines none.
  flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
  flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
