"""Hugging Face checkpoint export/import: round trips, sharding, FP8, config styles and clear errors."""

import copy
import json
import os
import re
import shutil
import tempfile

from absl.testing import absltest, parameterized
import chex
import jax
import ml_dtypes
import numpy as np
from flax import nnx

import models
from models import safetensors_io
from models.hf_config import model_config_from_hf, model_config_to_hf
from tests.models import tiny_configs as tc

B, T = 2, 12
# The loader fills config fields HF has no key for with ModelConfig defaults; building the originals
# with the default init_std (and drawing weights at std 0.3) makes the loaded config compare equal,
# so the loaded model also shares the original's compiled forward.
DEFAULT_INIT_STD = 0.006
FP8_LINEAR = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
                        r"\.weight$")


def _cfg(style):
  return tc.STYLES[style](init_std=DEFAULT_INIT_STD)


def _quantize_fp8(w, block=128):
  """Per-block e4m3 quantisation as DeepSeek ships it: (fp8 weight, float32 weight_scale_inv)."""
  rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
  q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
  scale = np.zeros((rows, cols), np.float32)
  for i in range(rows):
    for j in range(cols):
      tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
      scale[i, j] = max(np.abs(tile).max(), 1e-12) / 448.0
      q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
  return q, scale


def _dequantize_blocks(q, scale, block=128):
  out = q.astype(np.float32)
  for i, j in np.ndindex(*scale.shape):
    out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale[i, j]
  return out


class HfIoTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.models = {}
    for style in tc.STYLES:
      cls.models[style] = tc.build(_cfg(style), seed=0, std=0.3)
      models.save_hf_checkpoint(cls.models[style], cls._dir(style))
    cls.ids = tc.random_ids(_cfg("v3"), (B, T), seed=1) % 80  # valid for every style's vocab

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root)
    super().tearDownClass()

  @classmethod
  def _dir(cls, style):
    return os.path.join(cls.root, style)

  def _copy(self, style="v3"):
    dst = os.path.join(tempfile.mkdtemp(dir=self.root), "ckpt")
    shutil.copytree(self._dir(style), dst)
    return dst

  def _assert_same_model(self, loaded, style):
    original = self.models[style]
    self.assertEqual(loaded.cfg, original.cfg)
    mtp = bool(original.cfg.mtp_depth)
    got, want = tc.forward(loaded, self.ids, with_mtp=mtp), tc.forward(original, self.ids, with_mtp=mtp)
    np.testing.assert_array_equal(got.logits, want.logits)
    if mtp:
      np.testing.assert_array_equal(got.mtp_logits, want.mtp_logits)

  # Round trips and layouts.

  @parameterized.named_parameters(*[(s, s) for s in tc.STYLES])
  def test_round_trip(self, style):
    self._assert_same_model(models.load_hf_checkpoint(self._dir(style)), style)

  def test_saved_layout(self):
    cfg = _cfg("v3")
    tensors = safetensors_io.read(os.path.join(self._dir("v3"), "model.safetensors"))
    self.assertEqual(tensors["model.embed_tokens.weight"].shape, (cfg.vocab_size, cfg.hidden_size))
    self.assertEqual(tensors["lm_head.weight"].shape, (cfg.vocab_size, cfg.hidden_size))  # HF [out, in]
    self.assertEqual(tensors["model.layers.1.mlp.experts.15.down_proj.weight"].shape, (32, 16))
    self.assertIn("model.layers.2.mlp.gate.e_score_correction_bias", tensors)
    self.assertIn("model.layers.3.eh_proj.weight", tensors)  # the MTP layer follows the decoder layers
    self.assertNotIn("model.layers.0.mlp.gate.weight", tensors)  # first_k_dense = 1
    with open(os.path.join(self._dir("v3"), "config.json")) as f:
      hf = json.load(f)
    self.assertEqual((hf["model_type"], hf["num_nextn_predict_layers"], hf["n_group"]), ("deepseek_v3", 1, 4))

  def test_bf16_export(self):
    ckpt = os.path.join(tempfile.mkdtemp(dir=self.root), "bf16")
    models.save_hf_checkpoint(self.models["v3"], ckpt, dtype=ml_dtypes.bfloat16)
    stored = safetensors_io.SafetensorsFile(os.path.join(ckpt, "model.safetensors"))
    self.assertEqual(stored.entries["lm_head.weight"]["dtype"], "BF16")
    loaded = models.load_hf_checkpoint(ckpt)
    to_bf16 = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)
    want = jax.tree.map(to_bf16, nnx.state(self.models["v3"]))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(loaded)), want)
    self.assertFalse(np.array_equal(want["lm_head"][...], np.asarray(self.models["v3"].lm_head[...])))

  def test_sharded_checkpoint_loads_identically(self):
    ckpt = self._copy()
    tensors = safetensors_io.read(os.path.join(ckpt, "model.safetensors"))
    os.remove(os.path.join(ckpt, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
      safetensors_io.write(os.path.join(ckpt, shard), {k: tensors[k] for k in keys})
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}, f)
    self._assert_same_model(models.load_hf_checkpoint(ckpt), "v3")
    os.remove(os.path.join(ckpt, "model-00002-of-00002.safetensors"))
    with self.assertRaisesRegex(models.CheckpointError, r"model-00002-of-00002\.safetensors.*missing"):
      models.load_hf_checkpoint(ckpt)

  # Config dialects.

  @parameterized.named_parameters(("v3", "v3"), ("v2_yarn", "v2"))
  def test_old_and_new_rope_config_styles_agree(self, style):
    cfg = tc.STYLES[style](rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=8,
                           mscale=0.707, mscale_all_dim=0.707, rope_theta=20000.0)
    new = model_config_to_hf(cfg)
    old = copy.deepcopy(new)
    rope = old.pop("rope_parameters")
    old["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    old["rope_scaling"] = rope
    from_new, from_old = model_config_from_hf(new), model_config_from_hf(old)
    self.assertEqual(from_old, from_new)
    self.assertEqual(from_new, cfg.replace(init_std=from_new.init_std))
    self.assertEqual((from_old.rope_theta, from_old.rope_type, from_old.rope_factor), (20000.0, "yarn", 4.0))

  def test_default_rope_old_style(self):
    hf = model_config_to_hf(_cfg("v2_lite"))
    hf.pop("rope_parameters")
    hf.update(rope_theta=50000.0, rope_scaling=None)
    cfg = model_config_from_hf(hf)
    self.assertEqual((cfg.rope_type, cfg.rope_theta), ("default", 50000.0))

  # FP8.

  def test_dequantize_fp8_blocks(self):
    rng = np.random.default_rng(2)
    scale_inv = np.array([[0.5, 2.0, 1e-3], [7.0, 0.25, 3.0]], np.float32)
    w = rng.standard_normal((200, 300)).astype(ml_dtypes.float8_e4m3fn)
    out = safetensors_io.dequantize_fp8(w, scale_inv)
    self.assertEqual((out.shape, out.dtype), ((200, 300), np.float32))
    for i, j in np.ndindex(2, 3):
      rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
      np.testing.assert_array_equal(out[rows, cols], w[rows, cols].astype(np.float32) * scale_inv[i, j])
    with self.assertRaisesRegex(ValueError, r"scale shape \(2, 2\).*expected \(2, 3\)"):
      safetensors_io.dequantize_fp8(w, scale_inv[:, :2])

  def test_fp8_checkpoint_matches_dequantized_float32(self):
    tensors = safetensors_io.read(os.path.join(self._dir("v3"), "model.safetensors"))
    fp8, deq = dict(tensors), dict(tensors)
    quantized = [k for k in tensors if FP8_LINEAR.search(k)]
    self.assertGreater(len(quantized), 100)
    for k in quantized:
      q, scale = _quantize_fp8(tensors[k])
      fp8[k], fp8[k + "_scale_inv"] = q, scale
      deq[k] = _dequantize_blocks(q, scale)
    fp8_dir, deq_dir = self._copy(), self._copy()
    safetensors_io.write(os.path.join(fp8_dir, "model.safetensors"), fp8)
    safetensors_io.write(os.path.join(deq_dir, "model.safetensors"), deq)
    self.assertEqual(str(safetensors_io.SafetensorsFile(os.path.join(fp8_dir, "model.safetensors"))
                         .get(quantized[0]).dtype), "float8_e4m3fn")
    got = tc.forward(models.load_hf_checkpoint(fp8_dir), self.ids, with_mtp=True)
    want = tc.forward(models.load_hf_checkpoint(deq_dir), self.ids, with_mtp=True)
    np.testing.assert_array_equal(got.logits, want.logits)
    np.testing.assert_array_equal(got.mtp_logits, want.mtp_logits)
    # Quantisation changed the weights, so the comparison above is not trivially of the original.
    original = tc.forward(self.models["v3"], self.ids, with_mtp=True)
    self.assertGreater(np.abs(np.asarray(got.logits) - np.asarray(original.logits)).max(), 1e-4)

    del fp8[quantized[0] + "_scale_inv"]
    safetensors_io.write(os.path.join(fp8_dir, "model.safetensors"), fp8)
    with self.assertRaisesRegex(models.CheckpointError, re.escape(quantized[0] + "_scale_inv")):
      models.load_hf_checkpoint(fp8_dir)

  def test_unused_tensors_warn_unless_empty(self):
    ckpt = self._copy()
    path = os.path.join(ckpt, "model.safetensors")
    tensors = safetensors_io.read(path)
    # transformers writes width-0 shared-expert weights for V2 configs without shared experts.
    tensors["model.layers.1.mlp.shared_experts.extra_proj.weight"] = np.zeros((0, 16), np.float32)
    safetensors_io.write(path, tensors)
    with self.assertNoLogs(level="WARNING"):
      models.load_hf_checkpoint(ckpt)
    tensors["model.layers.1.mlp.stray.weight"] = np.ones((2, 3), np.float32)
    safetensors_io.write(path, tensors)
    with self.assertLogs(level="WARNING") as logs:
      models.load_hf_checkpoint(ckpt)
    self.assertIn("1 checkpoint tensors are not used", logs.output[0])
    self.assertIn("model.layers.1.mlp.stray.weight", logs.output[0])

  # Errors.

  def test_missing_directory(self):
    with self.assertRaisesRegex(models.CheckpointError, r"/no/such/ckpt.*does not exist"):
      models.load_hf_checkpoint("/no/such/ckpt")

  def test_missing_config(self):
    ckpt = self._copy()
    os.remove(os.path.join(ckpt, "config.json"))
    with self.assertRaisesRegex(models.CheckpointError, "config.json is missing"):
      models.load_hf_checkpoint(ckpt)

  def test_no_safetensors_files(self):
    ckpt = self._copy()
    os.remove(os.path.join(ckpt, "model.safetensors"))
    with self.assertRaisesRegex(models.CheckpointError, r"no \*\.safetensors files"):
      models.load_hf_checkpoint(ckpt)

  def test_missing_tensor(self):
    ckpt = self._copy()
    path = os.path.join(ckpt, "model.safetensors")
    tensors = safetensors_io.read(path)
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    safetensors_io.write(path, tensors)
    with self.assertRaisesRegex(models.CheckpointError, r"'model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight' is missing"):
      models.load_hf_checkpoint(ckpt)

  def test_config_shape_mismatch(self):
    ckpt = self._copy()
    with open(os.path.join(ckpt, "config.json")) as f:
      hf = json.load(f)
    hf["hidden_size"] = 40
    with open(os.path.join(ckpt, "config.json"), "w") as f:
      json.dump(hf, f)
    with self.assertRaisesRegex(models.CheckpointError, r"'model\.embed_tokens\.weight' has shape \(96, 32\)"):
      models.load_hf_checkpoint(ckpt)

  @parameterized.named_parameters(
      ("transposed", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", 1),
      ("expert", "model.layers.2.mlp.experts.3.gate_proj.weight", 0),
      # Tensors split into heads on load: the reshape must not fail before the shape check.
      ("heads_out", "model.layers.1.self_attn.q_b_proj.weight", 0),
      ("heads_in", "model.layers.0.self_attn.o_proj.weight", 1),
  )
  def test_tensor_shape_mismatch(self, name, axis):
    ckpt = self._copy()
    path = os.path.join(ckpt, "model.safetensors")
    tensors = safetensors_io.read(path)
    tensors[name] = np.delete(tensors[name], 0, axis=axis)
    safetensors_io.write(path, tensors)
    with self.assertRaises(ValueError) as ctx:
      models.load_hf_checkpoint(ckpt)
    self.assertIsInstance(ctx.exception, models.CheckpointError)
    self.assertIn(repr(name), str(ctx.exception))
    self.assertIn(str(tensors[name].shape), str(ctx.exception))

  def test_unsupported_architecture(self):
    ckpt = self._copy()
    with open(os.path.join(ckpt, "config.json")) as f:
      hf = json.load(f)
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with open(os.path.join(ckpt, "config.json"), "w") as f:
      json.dump(hf, f)
    with self.assertRaisesRegex(ValueError, r"unsupported architecture model_type='llama'"):
      models.load_hf_checkpoint(ckpt)


if __name__ == "__main__":
  absltest.main()
