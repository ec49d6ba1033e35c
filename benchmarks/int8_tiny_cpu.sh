#!/usr/bin/env bash
# What int8 weights change on a trained model (issue 9, item 3): train the tiny model (configs/tiny.py,
# the README's first command), then `eval.py --quantize=int8` computing in bfloat16 and in float32:
# eval bits/byte against the unquantized weights, and greedy agreement on 128 validation prompts
# (64 tokens each, 32 new tokens). Output committed in benchmarks/results/int8_tiny_cpu.txt.
#   bash benchmarks/int8_tiny_cpu.sh [DIR]     (default DIR /tmp/int8_tiny_cpu; python = .venv/bin/python)
set -euo pipefail
DIR=${1:-/tmp/int8_tiny_cpu}
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
rm -rf "$DIR" && mkdir -p "$DIR"
stage() { local name=$1; shift; echo "== $name: ${*//$DIR/DIR}"; local t0=$(date +%s); "$@" 2>&1 | grep -v "^[IW][0-9]" | sed "s|$DIR|DIR|g"; echo "== $name took $(( $(date +%s) - t0 )) s"; }
stage train $PY train.py --config=configs/tiny.py --workdir=$DIR/tiny
for dtype in bfloat16 float32; do
  stage "eval_int8_$dtype" $PY eval.py --workdir=$DIR/tiny --quantize=int8 --dtype=$dtype --quantize_prompts=128 \
    --output_dir=$DIR/eval_$dtype
done
