"""eval.py on a freshly trained tiny:test workdir: it reproduces the run's eval, reports sane expert
loads and task results, writes its files, and samples reproducibly."""

import json
import math
import os

import numpy as np
import pytest

import evaltest_util as util
from data import arithmetic


@pytest.fixture(scope="module")
def workdir():
  return util.trained_workdir()


@pytest.fixture(scope="module")
def eval_run(workdir):
  """(stdout, results dict) of one `eval.py --workdir=W --tasks=arithmetic`, run once per session."""
  def build(path):
    out = util.run("eval.py", f"--workdir={workdir}", "--tasks=arithmetic", "--task_examples=6",
                   "--task_batch_size=4")
    (path / "stdout.txt").write_text(out)
  path = util.once("eval_run", build)
  with open(workdir / "eval" / "results_6.json") as f:
    return (path / "stdout.txt").read_text(), json.load(f)


def test_reproduces_the_training_runs_last_eval(workdir, eval_run):
  evals = [r for r in util.metrics_rows(workdir) if "eval/bits_per_byte" in r]
  last = evals[-1]
  assert last["step"] == 6
  _, results = eval_run
  assert results["step"] == 6
  for key in ("eval/bits_per_byte", "eval/loss", "eval/perplexity", "eval/tokens"):
    assert results["eval"][key] == pytest.approx(last[key], abs=1e-5, rel=1e-6), key
  assert results["eval_setup"] == {"eval_batches": 2, "seq_len": 32, "batch_size": 8, "seed": 0}


def test_writes_results_tensorboard_and_a_summary(workdir, eval_run):
  stdout, _ = eval_run
  assert "bits/byte" in stdout and "results_6.json" in stdout
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "eval"))


def test_expert_load_statistics_are_sane(eval_run):
  _, results = eval_run
  loads = results["expert_load"]
  assert set(loads) == {"moe_layers", "mtp"}  # tiny:test: 3 layers, the first dense; one MTP block
  assert len(loads["moe_layers"]) == 2 and len(loads["mtp"]) == 1
  tokens = 2 * 8 * 32 * 2  # eval_batches x batch x seq_len x top-k
  for layer in loads["moe_layers"] + loads["mtp"]:
    frac = np.asarray(layer["fractions"])
    assert frac.shape == (8,)
    assert frac.sum() == pytest.approx(1.0, abs=1e-9)
    assert (frac >= 0).all()
    assert layer["load_max"] == pytest.approx(8 * frac.max()) and layer["load_max"] >= 1.0
    assert layer["load_min"] == pytest.approx(8 * frac.min()) and layer["load_min"] <= 1.0
    assert 0.0 < layer["routing_entropy"] <= 1.0
  for layer in loads["moe_layers"]:
    assert layer["tokens"] == tokens


def test_arithmetic_task_result(eval_run):
  stdout, results = eval_run
  task = results["tasks"]["arithmetic"]
  assert task["num_examples"] == 6 and len(task["examples"]) == 6
  for e in task["examples"]:  # the stored answers and scores are the reference's for each completion
    assert e["answer"] == str(arithmetic.answer(e["problem"])), e
    assert e["score"] == arithmetic.score(e["problem"], e["completion"]), e
  correct = sum(arithmetic.score(e["problem"], e["completion"]) for e in task["examples"])
  assert task["accuracy"] == pytest.approx(correct / 6)
  assert f"task arithmetic: accuracy {correct / 6:.3f} over 6 examples" in stdout


def _samples(workdir, seed):
  out = util.run("eval.py", f"--workdir={workdir}", "--mode=sample", "--prompt=def fib(", "--max_new_tokens=16",
                 "--temperature=0.8", "--top_k=0", "--top_p=0.95", "--repetition_penalty=1.0", f"--seed={seed}",
                 "--num_samples=2")
  return out[out.index("--- sample 0"):]


def test_sample_mode_prints_reproducible_completions(workdir):
  first, again = _samples(workdir, 0), _samples(workdir, 0)
  assert first.count("--- sample ") == 2 and first.count("def fib(") == 2
  assert first == again


def test_restore_and_expert_load_stats_in_process(workdir):
  from evaluation import metrics, restore
  config, model, step = restore.load_workdir(str(workdir))
  assert step == 6 and config.seq_len == 32 and model.cfg.n_routed_experts == 8
  assert restore.load_workdir(str(workdir), step=3)[2] == 3
  with pytest.raises(FileNotFoundError, match="step 4"):
    restore.load_workdir(str(workdir), step=4)
  stats = metrics.expert_load_stats({"moe_layers": np.array([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])})
  lopsided, balanced = stats["moe_layers"]
  assert lopsided["load_max"] == 4.0 and lopsided["load_min"] == 0.0 and lopsided["routing_entropy"] == 0.0
  assert balanced["load_max"] == balanced["load_min"] == 1.0
  assert math.isclose(balanced["routing_entropy"], 1.0)
  assert metrics.flat_scalars({"moe_layers": np.array([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]),
                               "mtp": np.array([1.0, 3.0])}) == {
      "moe/moe_layers/layer0/load_max": 4.0, "moe/moe_layers/layer0/load_min": 0.0,
      "moe/moe_layers/layer0/routing_entropy": 0.0, "moe/moe_layers/layer1/load_max": 1.0,
      "moe/moe_layers/layer1/load_min": 1.0, "moe/moe_layers/layer1/routing_entropy": 1.0,
      "moe/mtp/load_max": 1.5, "moe/mtp/load_min": 0.5, "moe/mtp/routing_entropy": pytest.approx(0.8112781)}


def test_a_checkpoint_of_another_model_is_an_error(workdir, tmp_path):
  """config.json describing more parameters than the checkpoint holds (attention biases here) used to
  restore "fine", leaving those parameters as abstract placeholders."""
  import models
  from evaluation import restore
  other = tmp_path / "other"
  other.mkdir()
  (other / "checkpoints").symlink_to(workdir / "checkpoints")
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["attention_bias"] = True
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(models.CheckpointError, match=r"checkpoint 6 in .* lacks \d+ of the parameters"):
    restore.load_workdir(str(other))


def test_workdir_written_before_the_execution_section_restores(workdir, tmp_path):
  """A committed config.json of the old layout (moe_backend & co. inside `model`) beside this run's
  checkpoints: it reads as the same model and execution, and restores the same weights."""
  import models
  from evaluation import restore
  old = tmp_path / "old"
  old.mkdir()
  (old / "checkpoints").symlink_to(workdir / "checkpoints")
  fixture = util.REPO / "tests" / "fixtures" / "old_workdir" / "config.json"
  (old / "config.json").write_text(fixture.read_text())
  assert "moe_backend" in json.loads(fixture.read_text())["model"]
  config, model, step = restore.load_workdir(str(old))
  assert dict(config.execution) == {"moe_backend": "capacity", "capacity_factor": 1.25, "remat_policy": "none",
                                    "attention_impl": "xla"}
  new_config, new_model, new_step = restore.load_workdir(str(workdir))
  assert model.cfg == new_model.cfg and step == new_step == 6
  # The same execution: fields the old layout predates (grouped_matmul) take their defaults.
  assert models.execution_from_dict(new_config.execution) == models.execution_from_dict(config.execution)
  np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(new_model.embed[...]))


def test_quantize_int8_reports_the_change(workdir, tmp_path):
  """eval.py --quantize=int8 evaluates both models and writes what changed: a wrong scale axis or a
  weight read unscaled would move bits/byte by far more than int8 rounding does."""
  out = util.run("eval.py", f"--workdir={workdir}", "--quantize=int8", "--dtype=bfloat16", "--quantize_prompts=4",
                 "--quantize_new_tokens=4", f"--output_dir={tmp_path}")
  assert "quantization int8 (compute bfloat16)" in out and "float32 vs bfloat16" in out
  with open(tmp_path / "quantization_6.json") as f:
    report = json.load(f)
  change = report["eval"]["eval/bits_per_byte"]
  assert abs(change["relative_change"]) < 0.02, change
  assert change["int8"] == pytest.approx(change["base"] * (1 + change["relative_change"]), rel=1e-9)
  for greedy in (report["greedy"], report["greedy_float32_vs_dtype"]):
    assert greedy["prompts"] == 4 and greedy["new_tokens"] == 4 and 0.0 <= greedy["identical_fraction"] <= 1.0
  assert (tmp_path / "int8" / "results_6.json").exists()
