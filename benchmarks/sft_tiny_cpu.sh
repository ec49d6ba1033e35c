#!/usr/bin/env bash
# The README's fine-tuning walk-through, timed stage by stage on this machine (a 2-core CPU in the
# committed output, benchmarks/results/sft_tiny_cpu.txt): pretrain the tiny model 300 steps, full SFT
# and LoRA rank 8 on a reverse-a-word task it has never seen, held-out exact match for each, and the
# merged LoRA weights against the adapter model.
#   bash benchmarks/sft_tiny_cpu.sh [DIR]     (default DIR /tmp/sft_tiny_cpu; python = .venv/bin/python)
set -euo pipefail
DIR=${1:-/tmp/sft_tiny_cpu}
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
rm -rf "$DIR" && mkdir -p "$DIR"
stage() { local name=$1; shift; echo "== $name: ${*//$DIR/DIR}"; local t0=$(date +%s); "$@" 2>&1 | grep -v "^[IW][0-9]" | sed "s|$DIR|DIR|g"; echo "== $name took $(( $(date +%s) - t0 )) s"; }
stage pretrain $PY train.py --config=configs/tiny.py --workdir=$DIR/base --config.total_steps=300
stage task $PY -m tools.make_sft_task --task=reverse --out_dir=$DIR/task
head -2 $DIR/task/test.jsonl
stage full_sft $PY train.py --config=configs/tiny_sft.py --workdir=$DIR/full --config.init_from=$DIR/base \
  --config.data.sft_files=$DIR/task/train.jsonl
stage full_eval $PY eval.py --workdir=$DIR/full --tasks=exact_match --task_file=$DIR/task/test.jsonl --task_examples=200
stage lora_sft $PY train.py --config=configs/tiny_sft.py --workdir=$DIR/lora --config.init_from=$DIR/base \
  --config.data.sft_files=$DIR/task/train.jsonl --config.lora.rank=8
stage lora_eval $PY eval.py --workdir=$DIR/lora --tasks=exact_match --task_file=$DIR/task/test.jsonl --task_examples=200
stage merge $PY -m tools.merge_lora --workdir=$DIR/lora --out=$DIR/merged
echo "== checkpoint sizes (full SFT vs LoRA, last step)"
du -sk $DIR/full/checkpoints/1000 $DIR/lora/checkpoints/1000 | sed "s|$DIR|DIR|g"
stage merge_check $PY - "$DIR" <<'PYEOF'
import sys
import jax
import numpy as np
from evaluation import restore
d = sys.argv[1]
ids = np.random.RandomState(0).randint(0, 256, (4, 64)).astype(np.int32)
logits = lambda model: np.asarray(jax.jit(lambda i: model(i))(ids))
_, adapted, _ = restore.load_workdir(f"{d}/lora")
_, merged, _ = restore.load_workdir(f"{d}/merged")
_, base, _ = restore.load_workdir(f"{d}/base")
print(f"max |merged - adapter model| logits: {np.abs(logits(merged) - logits(adapted)).max():.3g}")
print(f"max |adapter model - base| logits: {np.abs(logits(adapted) - logits(base)).max():.3g}")
PYEOF
