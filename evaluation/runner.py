"""What eval.py runs: evaluate a restored model on the run's validation batches (and tasks), or sample.

  results = runner.evaluate(config, model, tokenizer, step=6, output_dir="/tmp/tiny/eval",
                            tasks=["arithmetic"])
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

import models
from data import tokenizers

from evaluation import metrics
from evaluation import report
from evaluation import tasks as tasks_lib


def evaluate(config, model: models.Transformer, tokenizer: tokenizers.Tokenizer, *, step: int,
             output_dir: str | None, source: str = "", tasks: Sequence[str] = (), task_examples: int = 100,
             task_batch_size: int = 32, task_file: str | None = None, mesh=None) -> dict:
  """Loss / perplexity / bits-per-byte and per-layer expert load over `config.eval_batches` validation
  batches, then the named tasks. Writes results_<step>.json and TensorBoard events to `output_dir`
  (process 0; skipped when None) and returns the results dict."""
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} exceeds model vocab_size {model.cfg.vocab_size}")
  scalars, loads = metrics.evaluate_model(config, model, tokenizer, mesh=mesh)
  stats = metrics.expert_load_stats(loads)
  results = {
      "source": source,
      "step": int(step),
      "eval_setup": {k: config[k] for k in ("eval_batches", "seq_len", "batch_size", "seed")},
      "eval": scalars,
      "expert_load": stats,
  }
  tb_scalars = {**scalars, **metrics.flat_scalars(loads)}
  if tasks:
    results["tasks"] = tasks_lib.run(tasks, model, tokenizer, config, num_examples=task_examples,
                                     batch_size=task_batch_size, task_file=task_file)
    tb_scalars.update({f"tasks/{name}/accuracy": r["accuracy"] for name, r in results["tasks"].items()})
  if output_dir and jax.process_index() == 0:
    results["path"] = report.write(output_dir, step, results, tb_scalars)
  return results
