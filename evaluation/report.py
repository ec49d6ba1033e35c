"""Where evaluation results go: OUTPUT_DIR/results_<step>.json, TensorBoard events, a console summary."""

from __future__ import annotations

import json
import os

from absl import logging


def write(output_dir: str, step: int, results: dict, scalars: dict[str, float]) -> str:
  """Writes results_<step>.json and the scalars as TensorBoard events (at `step`); returns the path."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, f"results_{step}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("tensorboardX is not installed; wrote %s only", path)
    return path
  with SummaryWriter(output_dir) as tb:
    for key, value in scalars.items():
      tb.add_scalar(key, value, int(step))
  return path


def summary(results: dict) -> str:
  """A few human-readable lines: LM metrics, the worst-balanced MoE layer, task accuracies."""
  lines = [f"{results['source']} step {results['step']}"]
  ev = results.get("eval", {})
  if ev:
    lines.append(f"  eval  loss {ev['eval/loss']:.4f}  perplexity {ev['eval/perplexity']:.3f}  "
                 f"bits/byte {ev['eval/bits_per_byte']:.4f}  ({ev['eval/tokens']:.0f} tokens, "
                 f"{results['eval_setup']['eval_batches']} batches)")
  for stack, layers in results.get("expert_load", {}).items():
    for layer in layers:
      lines.append(f"  moe {stack} layer {layer['layer']}: load max {layer['load_max']:.2f}  "
                   f"min {layer['load_min']:.2f}  entropy {layer['routing_entropy']:.3f}")
  for task, res in results.get("tasks", {}).items():
    lines.append(f"  task {task}: accuracy {res['accuracy']:.3f} over {res['num_examples']} examples")
  return "\n".join(lines)
