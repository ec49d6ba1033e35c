#!/usr/bin/env bash
# benchmarks/decode.py on a GPU machine whose image has jax (CUDA) and flax but not ml_collections:
# run from the repo root there with the MaxText peer's wheel folder carried (benchmarks/gpu_tests.sh
# says how it is made). Usage: bash benchmarks/decode_gpu.sh TREE [decode.py flags...]
# TREE is the checkout to time (e.g. a `git archive` of an older commit, with this decode.py copied in);
# outputs go to $OUT (or ./decode_logs).
set -u
OUT=${OUT:-decode_logs}; mkdir -p "$OUT"
if [ ! -d /tmp/site/ml_collections ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .peer/maxtext/wheels/ml_collections-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
tree=$1; shift
(cd "$tree" && python3 -m benchmarks.decode "$@")
