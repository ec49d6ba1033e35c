"""Bad run configs fail with one clear ValueError before anything compiles.

`train_and_evaluate` runs with `jax.jit` replaced by a function that raises `Compiled`, so an error
that only surfaced while compiling (or later) fails the test. Cases that need several devices (mesh
divisibility) run in one subprocess with 8 fake CPU devices; the rest run here, on however many
devices this process has.
"""

import json
import os
import pathlib
import subprocess
import tempfile
import textwrap
from unittest import mock

import jax
from absl.testing import absltest, parameterized

import train_testlib as lib
from configs import tiny
from training import loop


class Compiled(Exception):
  pass


def _config(**fields):
  config = tiny.get_config("test")
  config.update(batch_size=8, seq_len=32, total_steps=6)  # the messages below quote these
  config.data.data_dir = lib.data_dir()
  for key, value in fields.items():
    target = config
    *parents, name = key.split(".")
    for p in parents:
      target = target[p]
    target[name] = value
  return config


def _train_until_compile(config, workdir):
  with mock.patch.object(jax, "jit", side_effect=Compiled("jax.jit was called")):
    loop.train_and_evaluate(config, str(workdir))


_MULTI_DEVICE_CASES = {
    # name: config fields (the mesh always multiplies to 8 unless the case is about that)
    "heads_not_divisible_by_tensor": {"mesh.data": 1, "mesh.tensor": 8},
    "experts_not_divisible_by_expert": {"model.n_routed_experts": 6, "mesh.data": 2, "mesh.expert": 4},
    "microbatch_not_divisible_by_batch_shards": {"grad_accum_steps": 2, "mesh.data": 8},
    "mesh_product_is_not_the_device_count": {"mesh.data": 3, "mesh.fsdp": 2},
    "valid": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2},
}

_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{testdir!r}, {testdir!r} + "/.."]  # this suite's modules and session_scratch
    import jax
    import validate_test as t
    import train_testlib as lib
    lib.set_root({root!r})
    results = {{"devices": jax.device_count()}}
    for name, fields in t._MULTI_DEVICE_CASES.items():
      try:
        t._train_until_compile(t._config(**fields), {workdir!r} + "/" + name)
        results[name] = ["no error", ""]
      except Exception as e:
        results[name] = [type(e).__name__, str(e)]
    with open({out!r}, "w") as f:
      json.dump(results, f)
""")


def _multi_device(path: pathlib.Path):
  lib.data_dir()  # built here, not raced by the subprocess
  script = _SCRIPT.format(testdir=str(pathlib.Path(__file__).parent), root=str(lib.root()),
                          workdir=str(path), out=str(path / "results.json"))
  proc = subprocess.run([lib.PYTHON, "-c", script], cwd=lib.REPO, env=lib.env(devices=8),
                        capture_output=True, text=True, timeout=lib.TIMEOUT_S)
  if proc.returncode:
    raise AssertionError(f"validation subprocess failed:\n{proc.stderr[-3000:]}")


class MultiDeviceValidationTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with open(lib.once("validate_8_devices", _multi_device) / "results.json") as f:
      cls.results = json.load(f)

  def test_eight_devices(self):
    self.assertEqual(self.results["devices"], 8)

  @parameterized.named_parameters(
      ("heads", "heads_not_divisible_by_tensor", "num_heads 4 is not divisible by the tensor axis (8)"),
      ("experts", "experts_not_divisible_by_expert", "n_routed_experts 6 is not divisible by the expert axis (4)"),
      ("microbatch", "microbatch_not_divisible_by_batch_shards",
       "microbatch of 4 sequences does not split over the 8 batch shards"),
      ("mesh_product", "mesh_product_is_not_the_device_count", "has 6 devices (the product of its axes) but there "
       "are 8 devices"),
  )
  def test_error(self, case, message):
    kind, text = self.results[case]
    self.assertEqual(kind, "ValueError", text)
    self.assertIn(message, text)

  def test_a_valid_mesh_reaches_compilation(self):
    # The other cases' errors are not just "everything fails before jit": a good config gets there.
    self.assertEqual(self.results["valid"][0], "Compiled", self.results["valid"][1])


class ValidationTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self._tempdir()

  def _tempdir(self) -> str:
    tmp = tempfile.TemporaryDirectory(dir=lib.root())
    self.addCleanup(tmp.cleanup)
    return tmp.name

  def assertFailsBeforeCompiling(self, config, *messages, workdir=None):
    with self.assertRaises(ValueError) as ctx:
      _train_until_compile(config, workdir or self.workdir)
    for message in messages:
      self.assertIn(message, str(ctx.exception))
    return str(ctx.exception)

  def test_a_valid_config_reaches_compilation(self):
    with self.assertRaises(Compiled):
      _train_until_compile(_config(), self.workdir)

  def test_sequence_longer_than_the_model_positions(self):
    self.assertFailsBeforeCompiling(_config(seq_len=128), "seq_len 128 exceeds", "max_position_embeddings 64")

  def test_top_k_above_the_number_of_experts(self):
    self.assertFailsBeforeCompiling(_config(**{"model.num_experts_per_tok": 9}), "num_experts_per_tok (top-k) 9",
                                    "n_routed_experts=8")

  def test_mesh_product_differs_from_the_device_count(self):
    n = jax.device_count()
    self.assertFailsBeforeCompiling(_config(**{"mesh.data": n + 1}),
                                    f"has {n + 1} devices (the product of its axes) but there are {n} devices")

  def test_batch_not_divisible_by_grad_accum_steps(self):
    self.assertFailsBeforeCompiling(_config(grad_accum_steps=3), "batch_size 8 is not divisible by grad_accum_steps 3")

  def test_unwritable_workdir(self):
    # A path below a regular file can be created by nobody, root included (chmod would not stop root).
    blocker = pathlib.Path(self.workdir) / "a_file"
    blocker.write_text("")
    self.assertFailsBeforeCompiling(_config(), "is not writable", str(blocker / "sub"), workdir=blocker / "sub")

  def test_corrupt_dataset_build(self):
    data_dir = self._tempdir()
    version_dir = pathlib.Path(data_dir, "python_stdlib", "lib", "1.0.0")
    version_dir.mkdir(parents=True)  # an interrupted build: the directory, no dataset_info.json
    self.assertFailsBeforeCompiling(_config(**{"data.data_dir": data_dir}), "incomplete or corrupt",
                                    "no dataset_info.json", str(version_dir))

  def test_text_files_glob_matching_nothing(self):
    pattern = os.path.join(self.workdir, "nothing_here", "*.txt")
    self.assertFailsBeforeCompiling(
        _config(**{"data.dataset": "text_files", "data.text_files": pattern,
                   "data.data_dir": self._tempdir()}),
        f"text_files pattern {pattern!r} matches no files")

  def test_every_bad_run_field_in_one_error(self):
    # keep_checkpoints=0 used to finish with exit 0 having deleted every checkpoint; eval_batches=-1 to
    # fail only at the first eval; a negative learning rate to train uphill.
    self.assertFailsBeforeCompiling(_config(keep_checkpoints=0, eval_batches=-1, **{"optim.peak_lr": -1.0}),
                                    "keep_checkpoints = 0", "eval_batches = -1", "optim.peak_lr = -1.0")

  def test_a_history_without_a_checkpoint_is_not_silently_restarted(self):
    pathlib.Path(self.workdir, "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    self.assertFailsBeforeCompiling(_config(), "has a training history", "--start_over")
    with self.assertRaises(Compiled):  # start_over moves it aside and goes on
      with mock.patch.object(jax, "jit", side_effect=Compiled("jax.jit was called")):
        loop.train_and_evaluate(_config(), self.workdir, start_over=True)
    self.assertLen(list(pathlib.Path(self.workdir).glob("previous-*/metrics.jsonl")), 1)

  def test_tokenizer_larger_than_the_model_vocabulary(self):
    self.assertFailsBeforeCompiling(_config(**{"model.vocab_size": 128}), "tokenizer vocabulary", "exceeds")


if __name__ == "__main__":
  absltest.main()
