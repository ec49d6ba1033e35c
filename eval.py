"""Evaluate or sample a trained model.

  python eval.py --workdir=/tmp/tiny                        # loss, perplexity, bits/byte, expert load
  python eval.py --workdir=/tmp/tiny --tasks=arithmetic     # + arithmetic exact-match accuracy
  python eval.py --workdir=/tmp/sft --tasks=exact_match --task_file=test.jsonl   # prompt/completion lines
  python eval.py --workdir=/tmp/tiny --mode=sample --prompt="def fib(" --num_samples=2 --temperature=0.8
  python eval.py --hf_dir=/path/deepseek-dir --eval_batches=4 --seq_len=512   # an HF checkpoint

Eval uses the run's own validation batches (config.json: seq_len, batch_size, eval_batches, seed), so
it reproduces the eval the training run logged at the checkpoint's step. Results go to
WORKDIR/eval/results_<step>.json and TensorBoard events in WORKDIR/eval (--output_dir to change).
"""

import os
import sys

import jax
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF DeepSeek checkpoint directory with tokenizer.json.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
_MODE = flags.DEFINE_enum("mode", "eval", ["eval", "sample"], "Evaluate, or print sampled completions.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default WORKDIR/eval or HF_DIR/eval).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Override config.eval_batches (0 = whole split).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override config.data.data_dir (where TFDS data is built).")
_TASKS = flags.DEFINE_list("tasks", [], "Task evaluations to run, e.g. arithmetic.")
_TASK_EXAMPLES = flags.DEFINE_integer("task_examples", 100, "Problems per task.")
_TASK_FILE = flags.DEFINE_string("task_file", None, "exact_match: JSONL of prompt/completion (or messages) lines.")
_TASK_BATCH = flags.DEFINE_integer("task_batch_size", 32, "Prompts per generate call in tasks.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "--hf_dir only: eval row length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "--hf_dir only: eval batch size.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (--workdir: only when given; default the run's).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"], "Also evaluate the model with its weights quantized "
                              "(inference.quantize) and report the change against the unquantized weights.")
_QUANTIZE_PROMPTS = flags.DEFINE_integer("quantize_prompts", 64, "--quantize: validation prompts for greedy agreement.")
_QUANTIZE_TOKENS = flags.DEFINE_integer("quantize_new_tokens", 32, "--quantize: greedy tokens compared per prompt.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Sample mode: the prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Sample mode: tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sample mode: 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample mode: 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Sample mode: 1 = off.")
_REPETITION = flags.DEFINE_float("repetition_penalty", 1.0, "Sample mode: 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sample mode: sampling seed.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Sample mode: completions to print.")


def _flag_problems() -> list[str]:
  from evaluation import tasks
  problems = []
  unknown = sorted(set(_TASKS.value) - set(tasks.TASKS))
  if unknown:
    problems.append(f"unknown --tasks {unknown}; known: {sorted(tasks.TASKS)}")
  if set(_TASKS.value) & set(tasks.NEEDS_TASK_FILE) and not _TASK_FILE.value:
    problems.append("--tasks=exact_match needs --task_file=F.jsonl")
  if _TASK_FILE.value and not os.path.isfile(_TASK_FILE.value):
    problems.append(f"--task_file {_TASK_FILE.value!r} is not a file")
  for name in ("task_examples", "task_batch_size", "num_samples", "max_new_tokens", "seq_len", "batch_size",
               "quantize_prompts", "quantize_new_tokens"):
    if flags.FLAGS[name].value < 1:
      problems.append(f"--{name} must be >= 1, got {flags.FLAGS[name].value}")
  if _EVAL_BATCHES.value is not None and _EVAL_BATCHES.value < 0:
    problems.append(f"--eval_batches must be >= 0 (0: the whole split), got {_EVAL_BATCHES.value}")
  if not 0 <= _TEMPERATURE.value < float("inf"):
    problems.append(f"--temperature must be >= 0 (0: greedy), got {_TEMPERATURE.value}")
  if not 0 < _TOP_P.value <= 1:
    problems.append(f"--top_p must lie in (0, 1] (1: off), got {_TOP_P.value}")
  if _TOP_K.value < 0:
    problems.append(f"--top_k must be >= 0 (0: off), got {_TOP_K.value}")
  if not 0 < _REPETITION.value < float("inf"):
    problems.append(f"--repetition_penalty must be > 0 (1: off), got {_REPETITION.value}")
  return problems


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_WORKDIR.value) == bool(_HF_DIR.value):
    raise app.UsageError("pass exactly one of --workdir and --hf_dir")
  problems = _flag_problems()  # before anything loads or runs
  if problems:
    sys.exit("eval.py: " + "; ".join(problems))
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and grain INFO lines would bury the results
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  jax.config.update("jax_threefry_partitionable", True)
  from evaluation import restore, runner, sample  # after distributed init

  if _WORKDIR.value:
    dtype = _DTYPE.value if flags.FLAGS["dtype"].present else None
    config, model, step = restore.load_workdir(_WORKDIR.value, step=_STEP.value, dtype=dtype)
    source, output_dir = _WORKDIR.value, _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "eval")
  else:
    config, model, step = restore.load_hf(_HF_DIR.value, dtype=_DTYPE.value, seq_len=_SEQ_LEN.value,
                                          batch_size=_BATCH_SIZE.value)
    source, output_dir = _HF_DIR.value, _OUTPUT_DIR.value or os.path.join(_HF_DIR.value, "eval")
  if _EVAL_BATCHES.value is not None:
    config.eval_batches = _EVAL_BATCHES.value
  if _DATA_DIR.value is not None:
    config.data.data_dir = _DATA_DIR.value
  tokenizer = restore.tokenizer_for(config)

  if _MODE.value == "sample":
    texts = sample.sample(model, tokenizer, _PROMPT.value, num_samples=_NUM_SAMPLES.value,
                          max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                          top_p=_TOP_P.value, repetition_penalty=_REPETITION.value, seed=_SEED.value)
    for i, text in enumerate(texts):
      print(f"--- sample {i} (step {step}, seed {_SEED.value}) ---\n{_PROMPT.value}{text}", flush=True)
    return
  results = runner.evaluate(config, model, tokenizer, step=step, output_dir=output_dir, source=source,
                            tasks=_TASKS.value, task_examples=_TASK_EXAMPLES.value,
                            task_batch_size=_TASK_BATCH.value, task_file=_TASK_FILE.value)
  if jax.process_index() == 0:
    print(runner.report.summary(results))
    if "path" in results:
      print(f"wrote {results['path']}")
  if _QUANTIZE.value:
    _report_quantization(config, model, tokenizer, results, step, source, output_dir)


def _report_quantization(config, model, tokenizer, base, step, source, output_dir):
  """Evaluates the quantized model like the unquantized one (results under OUTPUT_DIR/<method>) and
  prints and writes (quantization_<step>.json) what changed."""
  import json  # pylint: disable=import-outside-toplevel
  import inference  # pylint: disable=import-outside-toplevel
  from evaluation import quantization, runner  # pylint: disable=import-outside-toplevel
  method = _QUANTIZE.value
  quantized = inference.quantize(model, method)
  results = runner.evaluate(config, quantized, tokenizer, step=step, source=f"{source} ({method})",
                            output_dir=os.path.join(output_dir, method), tasks=_TASKS.value,
                            task_examples=_TASK_EXAMPLES.value, task_batch_size=_TASK_BATCH.value,
                            task_file=_TASK_FILE.value)
  report = quantization.compare(config, model, quantized, base, results, method=method,
                                num_prompts=_QUANTIZE_PROMPTS.value, new_tokens=_QUANTIZE_TOKENS.value)
  if jax.process_index() == 0:
    print(runner.report.summary(results))
    print(quantization.summary(report))
    path = os.path.join(output_dir, f"quantization_{step}.json")
    with open(path, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
