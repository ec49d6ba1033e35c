#!/usr/bin/env bash
# benchmarks/train_step.py on a GPU machine whose image has jax (CUDA), flax and optax but not
# ml_collections or grain: run from the repo root there with the MaxText peer's wheel folder carried
# (benchmarks/gpu_tests.sh says how it is made).
#   Usage: bash benchmarks/train_step_gpu.sh TREE NAME [train_step.py flags...]
# TREE is the checkout to time (`.`, or a `git archive` of an older commit for a baseline in the same
# call). Writes three files to $OUT (or ./train_step_logs), since the device returns at most 8 files a
# call: NAME.json (--json), NAME.txt (the printout) and, when the flags include --profile_dir, every traced
# variant's `benchmarks.trace_summary` in NAME_traces.txt.
set -u
OUT=${OUT:-train_step_logs}; mkdir -p "$OUT"
tree=$1; name=$2; shift 2
if [ ! -d /tmp/site/grain ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .peer/maxtext/wheels/*.whl > /dev/null || exit 1
fi
# tokamax (in the peer's wheels) imports xprof for benchmarking only: a stub stands in.
mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
out=$(cd "$OUT" && pwd)
(cd "$tree" && python3 -m benchmarks.train_step --json="$out/$name.json" "$@") > "$out/$name.txt" 2>&1
status=$?
profile_dir=$(printf '%s\n' "$@" | sed -n 's/^--profile_dir=//p' | tail -n 1)
if [ -n "$profile_dir" ]; then
  for dir in "$tree/$profile_dir"/*/ "$profile_dir"/*/; do
    trace=$(find "$dir" -name perfetto_trace.json.gz 2>/dev/null | head -n 1)
    [ -n "$trace" ] || continue
    echo "== $(basename "$dir")"
    python3 -m benchmarks.trace_summary "$trace" --top=60
  done > "$out/${name}_traces.txt" 2>&1
fi
tail -n 12 "$out/$name.txt"
exit $status
