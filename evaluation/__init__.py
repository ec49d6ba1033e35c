"""Evaluation of trained models: restore a run (or an HF checkpoint), validation loss / perplexity /
bits-per-byte exactly as training computes them, per-layer expert load, task accuracy, sampling.

  from evaluation import restore, runner, sample
  config, model, step = restore.load_workdir("/tmp/tiny")
  tok = restore.tokenizer_for(config)
  results = runner.evaluate(config, model, tok, step=step, output_dir="/tmp/tiny/eval", tasks=["arithmetic"])
  print(sample.sample(model, tok, "def fib(", num_samples=2, temperature=0.8, seed=0))

Modules: restore (workdir / HF → model), metrics (LM metrics + expert-load statistics), tasks (task
evaluations, e.g. arithmetic exact match), sample (text prompts → completions), report (results JSON,
TensorBoard, summary), runner (what eval.py calls).
"""
