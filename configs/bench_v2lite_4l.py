"""The GPU benchmark model: DeepSeek-V2-Lite layer shapes, 4 layers (the first dense), 4K positions.

Same shapes as MaxText's V2-Lite-4-layer comparison (batch 8 x 2048 on one H100):
  python -m tools.plan --config=configs/bench_v2lite_4l.py
"""

from configs import deepseek_v2_lite
from configs.common import run_config


def get_config():
  model = deepseek_v2_lite.model_fields()
  model.update(num_layers=4, max_position_embeddings=4096, rope_type="default")
  config = run_config(model)
  # Adam's moments in bf16, as DeepSeek-V3 trains: 6.3 ms less per step on an H100 (benchmarks/RESULTS.md).
  config.optim.moment_dtype = "bfloat16"
  return config
