#!/usr/bin/env bash
# The README's R1-Zero walk-through, timed stage by stage on this machine (a 2-core CPU in the committed
# output, benchmarks/results/r1_zero_tiny_cpu.txt): pretrain the tiny MoE model on arithmetic text, GRPO
# on arithmetic problems from it, sequence-distil the GRPO model into a dense student, and greedy
# held-out exact match (500 validation problems) of all three, with sample completions before/after.
#   bash benchmarks/r1_zero_tiny_cpu.sh [DIR]     (default DIR /tmp/r1_zero_tiny; python = .venv/bin/python)
set -euo pipefail
DIR=${1:-/tmp/r1_zero_tiny}
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
rm -rf "$DIR" && mkdir -p "$DIR"
stage() { local name=$1; shift; echo "== $name: ${*//$DIR/DIR}"; local t0=$(date +%s); "$@" 2>&1 | grep -v "^[IW][0-9]" | sed "s|$DIR|DIR|g"; echo "== $name took $(( $(date +%s) - t0 )) s"; }
stage base $PY train.py --config=configs/r1_zero_tiny.py:base --workdir=$DIR/base
stage base_eval $PY eval.py --workdir=$DIR/base --tasks=arithmetic --task_examples=500
stage grpo $PY train.py --config=configs/r1_zero_tiny.py:grpo --workdir=$DIR/grpo --config.init_from=$DIR/base
stage grpo_eval $PY eval.py --workdir=$DIR/grpo --tasks=arithmetic --task_examples=500
stage distill $PY train.py --config=configs/r1_zero_tiny.py:distill --workdir=$DIR/student \
  --config.distill.teacher=$DIR/grpo
stage student_eval $PY eval.py --workdir=$DIR/student --tasks=arithmetic --task_examples=500
stage summary $PY - "$DIR" <<'PYEOF'
import glob
import json
import re
import sys

d = sys.argv[1]


def task(workdir):
  path = sorted(glob.glob(f"{d}/{workdir}/eval/results_*.json"), key=lambda p: int(p.split("_")[-1][:-5]))[-1]
  return json.load(open(path))["tasks"]["arithmetic"]


def by_op(result):
  ops = {}
  for e in result["examples"]:
    op = next(c for c in "+*-" if c in e["problem"][1:])
    ops.setdefault(op, []).append(e["score"])
  return "  ".join(f"{op} {sum(v) / len(v):.3f}" for op, v in sorted(ops.items()))


def value_correct(result):
  """The fraction whose first number has the answer's value in any form ("25.0" counts): the arithmetic
  the model knows, apart from how it writes it."""
  def ok(e):
    m = re.search(r"-?\d+(?:\.\d+)?", e["completion"])
    return m is not None and float(m.group(0)) == int(e["answer"])
  return sum(map(ok, result["examples"])) / len(result["examples"])


def params(workdir):
  rows = [json.loads(l) for l in open(f"{d}/{workdir}/metrics.jsonl")]
  return int(next(r for r in rows if "params/total" in r)["params/total"])


rows = [json.loads(l) for l in open(f"{d}/grpo/metrics.jsonl")]
rewards = [(r["step"], r["grpo/reward_mean"]) for r in rows if "grpo/reward_mean" in r]
tenth = max(1, len(rewards) // 10)
first, last = rewards[:tenth], rewards[-tenth:]
print(f"grpo/reward_mean: first {len(first)} steps {sum(v for _, v in first) / len(first):.3f}, "
      f"last {len(last)} steps {sum(v for _, v in last) / len(last):.3f}")
results = {w: task(w) for w in ("base", "grpo", "student")}
for w, r in results.items():
  print(f"{w:8s} params {params(w):>9,}  exact match {r['accuracy']:.3f} over {r['num_examples']}  ({by_op(r)})"
        f"  value right in any form {value_correct(r):.3f}")
print(f"student / teacher accuracy: {results['student']['accuracy'] / max(results['grpo']['accuracy'], 1e-9):.2f}")
print("problem     answer  base      grpo      student")
for b, g, s in list(zip(*(results[w]["examples"] for w in ("base", "grpo", "student"))))[:12]:
  print(f"{b['problem']:11s} {b['answer']:7s} {b['completion']!r:9s} {g['completion']!r:9s} {s['completion']!r:9s}")
PYEOF
