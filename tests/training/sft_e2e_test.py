"""Supervised fine-tuning end to end: train.py --config=configs/tiny_sft.py from a pretraining workdir
(full and LoRA), from an HF directory, resume after a crash, tools.merge_lora, eval.py's exact_match.

The base is the session's 6-step tiny:test pretraining run (train_testlib.reference()); the data is a
small `tools.make_sft_task` reverse task. Every run is a 4-step train.py subprocess.
"""

import json
import math
import pathlib
import signal
import subprocess
import tempfile

import jax
import numpy as np
from absl.testing import absltest

import models
import train_testlib as lib
from configs import tiny
from flax import nnx
from models import lora
from training import adapters as adapters_lib
from training.state import ModelDef
from evaluation import restore
from tools import make_sft_task
from tools import merge_lora

HF_FIXTURE = lib.REPO / "tests" / "fixtures" / "hf" / "v2_lite_tiny"  # vocab 89, BOS 1, EOS 2
SFT_FLAGS = (
    "--config=configs/tiny_sft.py",
    "--config.total_steps=4",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.checkpoint_every=2",
    "--config.eval_every=2",
    "--config.eval_batches=1",
    "--config.log_every=1",
    "--config.execution.moe_backend=dropless",
)


def _task() -> pathlib.Path:
  return lib.once("sft_task", lambda p: make_sft_task.write_task("reverse", str(p), train=300, test=8))


def _command(workdir, *flags, hook: dict | None = None) -> list[str]:
  entry = str(lib.DRIVER if hook else lib.REPO / "train.py")
  return [lib.PYTHON, entry, *SFT_FLAGS, f"--config.data.sft_files={_task() / 'train.jsonl'}",
          f"--workdir={workdir}", *flags]


def _train(workdir, *flags, hook: dict | None = None, expect_rc: int = 0) -> pathlib.Path:
  env = lib.env()
  if hook:
    env["TRAIN_TEST_HOOK"] = json.dumps(hook)
  log = pathlib.Path(f"{workdir}.log")
  with open(log, "ab") as f:
    rc = subprocess.run(_command(workdir, *flags, hook=hook), cwd=lib.REPO, env=env, stdout=f,
                        stderr=subprocess.STDOUT, timeout=lib.TIMEOUT_S).returncode
  if rc != expect_rc:
    raise AssertionError(f"train.py exited {rc}, expected {expect_rc}; {log}:\n{lib.log_tail(log)}")
  return pathlib.Path(workdir)


def _full(path):
  _train(path / "run", f"--config.init_from={lib.reference()}")


def _killed_then_resumed(path):
  workdir = path / "run"
  _train(workdir, f"--config.init_from={lib.reference()}", hook={"kill_after_save": 2}, expect_rc=-signal.SIGKILL)
  _train(workdir, f"--config.init_from={lib.reference()}")


def _lora(path):
  _train(path / "run", f"--config.init_from={lib.reference()}", "--config.lora.rank=4")


def _hf_tokenizer(directory: pathlib.Path) -> pathlib.Path:
  """A character-level tokenizer.json whose special ids fit the HF fixture (pad 0, BOS 1, EOS 2), with a
  DeepSeek-like chat template."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 +=?!#$%&:;<>/|@^_~\n"))
  names = ["<pad>", "<bos>", "<eos>", "<|User|>", "<|Assistant|>", "<unk>"] + chars
  tok = hf.Tokenizer(hf.models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
  tok.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex("."), behavior="isolated")
  tok.add_special_tokens(names[:5])
  directory.mkdir(parents=True)
  tok.save(str(directory / "tokenizer.json"))
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
              "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}{{ eos_token }}"
              "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|Assistant|>{% endif %}")
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": template}))
  return directory


def _hf_source(path):
  tok_dir = _hf_tokenizer(path / "tokenizer")
  chat = path / "chat.jsonl"
  with open(_task() / "train.jsonl") as f:
    lines = [json.loads(l) for l in f][:64]
  chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": l["prompt"]},
                                                   {"role": "assistant", "content": l["completion"]}]}) + "\n"
                          for l in lines))
  _train(path / "run", f"--config.init_from={HF_FIXTURE}", "--config.data.tokenizer=hf",
         f"--config.data.tokenizer_path={tok_dir}", f"--config.data.sft_files={chat}", "--config.lora.rank=2")


def _saved_values(workdir: pathlib.Path, step: int = 4) -> int:
  """Array elements a checkpoint's train state holds (params, optimizer moments, step)."""
  saved = json.loads((workdir / "checkpoints" / str(step) / "state" / "_METADATA").read_text())["tree_metadata"]
  return sum(math.prod(v["value_metadata"]["write_shape"]) for v in saved.values()
             if v["value_metadata"]["value_type"] == "jax.Array")


def _logits(model, ids):
  return np.asarray(jax.jit(lambda i: model(i))(ids))


class SftRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = lib.reference()
    cls.full = lib.once("sft_full", _full) / "run"
    cls.lora = lib.once("sft_lora", _lora) / "run"

  def test_full_sft_starts_from_the_base_and_trains_on_completions_only(self):
    log = pathlib.Path(f"{self.full}.log").read_text()
    self.assertIn(f"initialised from {self.base} in", log)
    rows = lib.metrics_rows(self.full)
    counts = next(r for r in rows if "params/total" in r)
    self.assertEqual(counts["params/trainable"], counts["params/total"])
    tokens = [r["train/tokens"] for r in rows if "train/tokens" in r]
    # Completion targets only: a reverse-task line has 3-6 completion bytes + EOS of ~25 bytes.
    self.assertTrue(all(0 < t < 0.4 * 8 * 32 for t in tokens), tokens)
    self.assertTrue(any("eval/loss" in r for r in rows))
    self.assertEqual(json.loads((self.full / "config.json").read_text())["init_from"], str(self.base))

  def test_resume_after_a_kill_continues_the_new_run(self):
    path = lib.once("sft_killed", _killed_then_resumed)
    log = pathlib.Path(f"{path / 'run'}.log").read_text()
    self.assertIn("resumed from the checkpoint at step 2", log)
    resumed, uninterrupted = lib.logged(path / "run"), lib.logged(self.full)
    self.assertLess(lib.max_rel_diff(resumed, uninterrupted, [3, 4]), 1e-5)

  def test_lora_trains_a_small_fraction_and_checkpoints_little(self):
    counts = next(r for r in lib.metrics_rows(self.lora) if "params/total" in r)
    # tiny:test is 32 wide, so rank-4 adapters are a large share of it (rank 8 on configs/tiny.py is
    # 5.6 %: the next test); the adapters and their Adam moments are all that is saved.
    self.assertLess(counts["params/trainable"], 0.4 * counts["params/total"])
    saved = json.loads((self.lora / "checkpoints" / "4" / "state" / "_METADATA").read_text())["tree_metadata"]
    params = [key for key in saved if key.startswith("('params',")]
    self.assertNotEmpty(params)
    self.assertTrue(all(key.endswith(("'a')", "'b')")) for key in params), params)  # adapters, no base
    base = [key for key in saved if key.startswith("('base_params',")]
    self.assertEqual([saved[key]["value_metadata"]["value_type"] for key in base], ["Dict"])  # empty: {}
    # Saved values, from the checkpoints' own metadata (file sizes are not a measure here: orbax's
    # packing of the same arrays into data files varied by ±10 % between identical runs).
    lora_values, full_values = _saved_values(self.lora), _saved_values(self.full)
    self.assertLess(lora_values, 0.4 * full_values, (lora_values, full_values))

  def test_rank_8_on_the_tiny_model_trains_under_a_tenth_of_its_weights(self):
    cfg = models.from_dict(tiny.get_config().model.to_dict())
    template = ModelDef.abstract(cfg).params_template
    adapters = lora.count_params(adapters_lib.abstract_adapters(lora.plan(template, lora.LoraConfig(8, 16.0))))
    self.assertLess(adapters, 0.1 * lora.count_params(nnx.to_pure_dict(template)))

  def test_merge_gives_the_adapter_models_logits(self):
    _, adapted, _ = restore.load_workdir(str(self.lora))
    _, base, _ = restore.load_workdir(str(self.base))
    ids = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)
    expected = _logits(adapted, ids)
    self.assertGreater(np.abs(expected - _logits(base, ids)).max(), 1e-4)  # the adapters changed the model
    scratch = tempfile.TemporaryDirectory()
    self.addCleanup(scratch.cleanup)
    out = pathlib.Path(scratch.name)
    merge_lora.merge(str(self.lora), str(out / "merged"))
    _, merged, step = restore.load_workdir(str(out / "merged"))
    self.assertEqual(step, 4)
    self.assertLessEqual(np.abs(_logits(merged, ids) - expected).max(), 1e-5)
    merge_lora.merge(str(self.lora), str(out / "hf"), hf=True)
    reloaded = models.load_hf_checkpoint(str(out / "hf"))
    self.assertLessEqual(np.abs(_logits(reloaded, ids) - expected).max(), 1e-5)
    with self.assertRaisesRegex(ValueError, "not a LoRA run"):
      merge_lora.merge(str(self.full), str(out / "again"))

  def test_eval_exact_match_on_a_lora_workdir(self):
    task_file = _task() / "test.jsonl"
    subprocess.run([lib.PYTHON, str(lib.REPO / "eval.py"), f"--workdir={self.lora}", "--tasks=exact_match",
                    f"--task_file={task_file}", "--task_examples=4", "--task_batch_size=4", "--eval_batches=1"],
                   cwd=lib.REPO, env=lib.env(), check=True, capture_output=True, timeout=lib.TIMEOUT_S)
    results = json.loads((self.lora / "eval" / "results_4.json").read_text())
    task = results["tasks"]["exact_match"]
    self.assertEqual(task["num_examples"], 4)
    self.assertTrue(0.0 <= task["accuracy"] <= 1.0)
    with open(task_file) as f:
      first = json.loads(f.readline())
    self.assertEqual(task["examples"][0]["expected"], first["completion"])
    self.assertIn("eval/loss", results["eval"])

  def test_sft_with_lora_from_an_hf_directory(self):
    path = lib.once("sft_hf", _hf_source)
    log = pathlib.Path(f"{path / 'run'}.log").read_text()
    self.assertIn(f"initialised from {HF_FIXTURE} in", log)
    losses = lib.logged(path / "run")
    self.assertEqual(sorted(losses), [1, 2, 3, 4])
    self.assertTrue(all(np.isfinite(list(losses.values()))))


if __name__ == "__main__":
  absltest.main()
