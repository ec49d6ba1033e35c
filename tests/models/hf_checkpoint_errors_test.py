"""An HF checkpoint directory is untrusted: index, shard paths and config.json give named CheckpointErrors.

Each rule test failed on the loader before issue 12: it loaded shards from outside the directory, raised
json's, KeyError or TypeError messages without the file, or failed far from the bad config field.
"""

import json
import os
import re
import shutil
import tempfile

from absl.testing import absltest, parameterized
import numpy as np

import models
from models import safetensors_io
from models.hf import _Reader, read_hf_config
from models.hf_config import model_config_from_hf

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00003.safetensors"


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f)


class HfCheckpointErrorsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name
    self.ckpt = os.path.join(self.root, "ckpt")
    shutil.copytree(os.path.join(FIXTURES, "v3_tiny"), self.ckpt)

  def _path(self, name):
    return os.path.join(self.ckpt, name)

  def _assert_load_fails(self, *patterns):
    # load_hf_checkpoint reads config.json and opens every shard before it builds any model.
    with self.assertRaises(models.CheckpointError) as ctx:
      models.load_hf_checkpoint(self.ckpt)
    for pattern in patterns:
      self.assertRegex(str(ctx.exception), pattern)

  def test_fixture_opens(self):
    """The control: the unmodified copy reads, so each failure below is due to its one change."""
    self.assertLen(_Reader(self.ckpt).where, 207)
    self.assertEqual(model_config_from_hf(read_hf_config(self.ckpt)).hidden_size, 48)

  # model.safetensors.index.json

  def test_index_not_json_names_the_file(self):
    with open(self._path(INDEX), "w") as f:
      f.write('{"weight_map": {"lm_head.weight": ')
    self._assert_load_fails(re.escape(self._path(INDEX)) + r": the shard index is not valid JSON")

  @parameterized.named_parameters(
      ("not_an_object", ["weight_map"], r"must be a JSON object, got list"),
      ("no_weight_map", {"metadata": {}}, r"'weight_map' must be a non-empty object"),
      ("weight_map_list", {"weight_map": [SHARD1]}, r"'weight_map' must be a non-empty object"),
      ("shard_not_string", {"weight_map": {"lm_head.weight": 1}}, r"entry 'lm_head\.weight' maps to 1"),
  )
  def test_index_structure(self, index, pattern):
    _write_json(self._path(INDEX), index)
    self._assert_load_fails(re.escape(INDEX), pattern)

  def _point_shard1_at(self, target):
    """Moves shard 1 out of the checkpoint and makes the index name it by `target`."""
    outside = os.path.join(self.root, "outside.safetensors")
    shutil.move(self._path(SHARD1), outside)
    index = _read_json(self._path(INDEX))
    name = target(outside)
    index["weight_map"] = {k: name if v == SHARD1 else v for k, v in index["weight_map"].items()}
    _write_json(self._path(INDEX), index)
    return name

  @parameterized.named_parameters(
      ("absolute", lambda outside: outside),
      ("dotdot", lambda outside: "../outside.safetensors"),
      ("dotdot_inside_name", lambda outside: "sub/../../outside.safetensors"),
  )
  def test_index_path_escaping_the_directory(self, target):
    """Old code read the shard outside the directory and loaded the model."""
    name = self._point_shard1_at(target)
    self._assert_load_fails(r"weight_map entry 'lm_head\.weight' names shard " + re.escape(repr(name)),
                            r"not a relative path inside the checkpoint directory")

  def test_symlinked_shard_resolving_outside(self):
    self._point_shard1_at(lambda outside: SHARD1)
    os.symlink(os.path.join(self.root, "outside.safetensors"), self._path(SHARD1))
    self._assert_load_fails(r"weight_map entry 'lm_head\.weight' names shard '" + re.escape(SHARD1),
                            r"resolves to .*outside\.safetensors, outside the checkpoint directory")

  def test_symlinked_single_file_resolving_outside(self):
    """Without an index, the listed *.safetensors files obey the same rule."""
    os.remove(self._path(INDEX))
    for name in os.listdir(self.ckpt):
      if name.endswith(".safetensors"):
        shutil.move(self._path(name), os.path.join(self.root, name))
        os.symlink(os.path.join(self.root, name), self._path(name))
    self._assert_load_fails(r"resolves to .*, outside the checkpoint directory")

  def test_hub_cache_snapshot_symlinks_are_allowed(self):
    """The Hugging Face hub cache links snapshot files to ../../blobs: the escape check must allow it.

    (This also passed before issue 12; it guards the new check against rejecting the usual layout.)
    """
    repo = os.path.join(self.root, "models--org--tiny")
    snapshot = os.path.join(repo, "snapshots", "0123abc")
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(snapshot)
    for i, name in enumerate(sorted(os.listdir(self.ckpt))):
      blob = os.path.join(repo, "blobs", f"hash{i}")
      shutil.copy(self._path(name), blob)
      os.symlink(os.path.join("..", "..", "blobs", f"hash{i}"), os.path.join(snapshot, name))
    self.assertLen(_Reader(snapshot).where, 207)

  def test_shard_that_is_a_directory(self):
    os.remove(self._path(SHARD1))
    os.mkdir(self._path(SHARD1))
    self._assert_load_fails(re.escape(SHARD1) + r" named by .* is not a regular file")

  def test_tensor_stored_in_two_shards(self):
    """Old code silently took whichever shard came last."""
    path = self._path("model-00002-of-00003.safetensors")
    tensors = safetensors_io.read(path)
    tensors["lm_head.weight"] = np.zeros((97, 48), np.float32)
    safetensors_io.write(path, tensors)
    self._assert_load_fails(r"tensor 'lm_head\.weight' is stored in both model-00001-of-00003\.safetensors "
                            r"and model-00002-of-00003\.safetensors")

  def test_bad_shard_header_names_the_shard(self):
    with open(self._path(SHARD1), "r+b") as f:
      f.seek(12)
      f.write(b"\xff\xff")
    self._assert_load_fails(re.escape(self._path(SHARD1)) + r": corrupt safetensors header")

  # config.json

  def test_config_not_json_names_the_file(self):
    with open(self._path("config.json"), "w") as f:
      f.write('{"model_type": "deepseek_v3",')
    self._assert_load_fails(re.escape(self._path("config.json")) + r": config.json is not valid JSON")

  def test_config_not_an_object(self):
    _write_json(self._path("config.json"), ["deepseek_v3"])
    self._assert_load_fails(r"config\.json: config\.json must be a JSON object, got list")

  @parameterized.named_parameters(
      ("int_as_string", "hidden_size", "48", r"'hidden_size' must be an integer >= 0, got '48' \(string\)"),
      ("int_as_float", "hidden_size", 48.0, r"'hidden_size' must be an integer >= 0, got 48\.0 \(number\)"),
      ("int_null", "hidden_size", None, r"'hidden_size' must be an integer >= 0, got None \(null\)"),
      ("int_bool", "num_hidden_layers", True, r"'num_hidden_layers' must be an integer >= 0, got True"),
      ("int_negative", "n_routed_experts", -16, r"'n_routed_experts' must be an integer >= 0, got -16"),
      ("bool_as_string", "attention_bias", "false", r"'attention_bias' must be true or false"),
      ("number_as_string", "rms_norm_eps", "1e-6", r"'rms_norm_eps' must be a finite number"),
      ("number_nan", "routed_scaling_factor", float("nan"), r"'routed_scaling_factor' must be a finite number"),
      ("optional_int_as_float", "q_lora_rank", 24.0, r"'q_lora_rank' must be an integer >= 0 or null"),
      ("rope_not_object", "rope_parameters", ["yarn"], r"'rope_parameters' must be an object or null"),
      ("string_as_number", "hidden_act", 1, r"'hidden_act' must be a string"),
  )
  def test_config_field_type(self, field, value, pattern):
    hf = _read_json(self._path("config.json"))
    hf[field] = value
    _write_json(self._path("config.json"), hf)
    self._assert_load_fails(re.escape(self._path("config.json")), pattern)
    with self.assertRaisesRegex(ValueError, pattern):  # the same check guards direct callers
      model_config_from_hf(hf)

  def test_rope_parameter_type(self):
    hf = _read_json(self._path("config.json"))
    hf["rope_parameters"]["factor"] = "4"
    _write_json(self._path("config.json"), hf)
    self._assert_load_fails(r"'rope_parameters\.factor' must be a finite number or null, got '4'")

  def test_v2_grouped_routing_needs_groups(self):
    """Old code passed n_group=None on to ModelConfig, which failed with a TypeError comparing None."""
    hf = _read_json(os.path.join(FIXTURES, "v2_tiny", "config.json"))
    hf["n_group"] = None
    with self.assertRaisesRegex(ValueError, r"'n_group' must be set to an integer for group_limited_greedy"):
      model_config_from_hf(hf)
    del hf["num_experts_per_tok"]
    with self.assertRaisesRegex(ValueError, r"'num_experts_per_tok' must be set to an integer for MoE layers"):
      model_config_from_hf(hf)

  def test_fp8_scale_shape_mismatch_names_the_tensor(self):
    ckpt = os.path.join(self.root, "fp8")
    shutil.copytree(os.path.join(FIXTURES, "v3_fp8"), ckpt)
    reader = _Reader(ckpt)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = os.path.join(ckpt, reader.where[name + "_scale_inv"])
    tensors = safetensors_io.read(shard)
    tensors[name + "_scale_inv"] = np.ones((2, 2), np.float32)
    safetensors_io.write(shard, tensors)
    with self.assertRaisesRegex(models.CheckpointError, re.escape(repr(name)) + r" in model-.*scale shape \(2, 2\)"):
      _Reader(ckpt).get(name)


if __name__ == "__main__":
  absltest.main()
