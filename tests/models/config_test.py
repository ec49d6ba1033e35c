"""ModelConfig validation and `from_dict`."""

import dataclasses
import json

from absl.testing import absltest, parameterized
import jax.numpy as jnp

import models
from tests.models import tiny_configs as tc


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, name) for name in tc.STYLES])
  def test_tiny_configs_are_valid(self, style):
    cfg = tc.STYLES[style]()
    self.assertEqual(cfg.num_moe_layers, 2)
    self.assertEqual(cfg.qk_head_dim, 16)
    with self.assertRaises(dataclasses.FrozenInstanceError):
      cfg.hidden_size = 7  # pytype: disable=not-writable

  @parameterized.named_parameters(
      ("odd_rope_dim", dict(qk_rope_head_dim=7), r"qk_rope_head_dim must be even, got 7"),
      ("top_k_above_experts", dict(num_experts_per_tok=17),
       r"num_experts_per_tok \(top-k\) 17 must be in \[1, n_routed_experts=16\]"),
      ("top_k_zero", dict(num_experts_per_tok=0), r"num_experts_per_tok \(top-k\) 0"),
      ("experts_not_divisible", dict(n_group=3), r"n_routed_experts 16 not divisible by n_group 3"),
      ("topk_group_above_groups", dict(topk_group=5), r"topk_group must be in \[1, n_group\]"),
      ("kept_groups_too_small", dict(topk_group=1, num_experts_per_tok=5), r"fewer experts than top-k"),
      ("yarn_without_original", dict(original_max_position_embeddings=None),
       r"YaRN needs original_max_position_embeddings"),
      ("first_k_dense_out_of_range", dict(first_k_dense=4), r"first_k_dense must lie in \[0, num_layers\]"),
      ("top2_sum_single_expert_groups", dict(n_group=16, topk_group=4), r"top2_sum group score needs >= 2"),
      ("mtp_depth_two", dict(mtp_depth=2), r"MTP depth"),
      ("unknown_score_func", dict(score_func="relu"), r"unknown score_func 'relu'"),
      ("unknown_rope_type", dict(rope_type="llama3"), r"unsupported rope_type 'llama3'"),
      # A zero group count is a plausible typo (HF V2 configs say n_group: null); it must be a clear
      # ValueError, not a ZeroDivisionError from the divisibility check.
      ("zero_groups", dict(n_group=0), r"n_group"),
      ("string_for_an_int", dict(hidden_size="48"), r"hidden_size must be an integer, got '48'"),
      ("bool_for_an_int", dict(num_layers=True), r"num_layers must be an integer, got True"),
      ("nan_for_a_float", dict(rope_theta=float("nan")), r"rope_theta must be a finite number, got nan"),
      ("unknown_dtype", dict(dtype="float33"), r"dtype must be a dtype name .*'float33'"),
      ("integer_params", dict(param_dtype="int32"), r"param_dtype must be a floating dtype, got int32"),
      ("zero_hidden", dict(hidden_size=0), r"hidden_size must be >= 1, got 0"),
      ("zero_heads", dict(num_heads=0), r"num_heads must be >= 1, got 0"),
      ("zero_q_lora", dict(q_lora_rank=0), r"q_lora_rank must be >= 1, got 0"),
      ("negative_eps", dict(rms_norm_eps=-1.0), r"rms_norm_eps must be > 0, got -1.0"),
      ("zero_theta", dict(rope_theta=0.0), r"rope_theta must be > 0, got 0.0"),
  )
  def test_bad_config_raises_helpful_value_error(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      tc.v3_style(**overrides)

  def test_every_problem_in_one_error(self):
    with self.assertRaises(ValueError) as ctx:
      tc.v3_style(hidden_size=0, qk_rope_head_dim=7, score_func="relu")
    message = str(ctx.exception)
    for part in ("hidden_size must be >= 1", "qk_rope_head_dim must be even", "unknown score_func 'relu'"):
      self.assertIn(part, message)

  def test_group_checks_skipped_without_moe_layers(self):
    cfg = tc.v3_style(num_layers=2, first_k_dense=2, mtp_depth=0, n_routed_experts=0)
    self.assertEqual(cfg.num_moe_layers, 0)

  def test_to_dict_from_dict_round_trip(self):
    cfg = tc.v3_style(dtype=jnp.bfloat16)
    d = cfg.to_dict()
    self.assertEqual((d["dtype"], d["param_dtype"]), ("bfloat16", "float32"))
    self.assertEqual(json.loads(json.dumps(d)), d)  # plain JSON, as a workdir's config.json keeps it
    self.assertEqual(models.from_dict(d), cfg)
    self.assertEqual(hash(models.from_dict(d)), hash(cfg))

  def test_dtypes_are_canonical(self):
    """A dtype given as a name, a jnp scalar type or a numpy dtype is one value (equal, same hash)."""
    by_name, by_type = tc.v3_style(dtype="bfloat16"), tc.v3_style(dtype=jnp.bfloat16)
    self.assertEqual(by_name, by_type)
    self.assertEqual(by_name.dtype, jnp.dtype(jnp.bfloat16))
    self.assertEqual(hash(by_name), hash(by_type))

  def test_from_dict_points_execution_fields_to_their_section(self):
    d = tc.v2_style().to_dict()
    d.update(moe_backend="capacity")
    with self.assertRaisesRegex(ValueError, r"\['moe_backend'\].*`execution` section"):
      models.from_dict(d)

  def test_from_dict_rejects_unknown_fields(self):
    d = tc.v2_style().to_dict()
    d.update(num_hidden_layers=3, hiden_size=32)
    with self.assertRaisesRegex(ValueError, r"unknown model config fields: \['hiden_size', 'num_hidden_layers'\]"):
      models.from_dict(d)

  def test_from_dict_validates(self):
    d = tc.v2_lite_style().to_dict()
    d["qk_rope_head_dim"] = 5
    with self.assertRaisesRegex(ValueError, "must be even"):
      models.from_dict(d)

  def test_replace_revalidates(self):
    with self.assertRaisesRegex(ValueError, "topk_group"):
      tc.v2_style().replace(topk_group=0)


if __name__ == "__main__":
  absltest.main()
