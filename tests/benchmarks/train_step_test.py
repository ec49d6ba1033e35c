"""The benchmark's variant parsing and batch construction (the timing itself runs on a GPU)."""

from absl.testing import absltest
import numpy as np

from benchmarks.train_step import parse_variant, random_batch


class TrainStepBenchmarkTest(absltest.TestCase):

  def test_parse_variant(self):
    self.assertEqual(parse_variant("dropless"), {"moe_backend": "dropless"})
    self.assertEqual(parse_variant("capacity:1.25+remat=full+attn=cudnn"),
                     {"moe_backend": "capacity", "capacity_factor": 1.25, "remat_policy": "full",
                      "attention_impl": "cudnn"})
    for bad in ("einsum", "capacity:1.0+remat", "dropless+heads=4"):
      with self.assertRaises(ValueError):
        parse_variant(bad)

  def test_random_batch_packs_equal_documents(self):
    batch = {k: np.asarray(v) for k, v in random_batch(vocab_size=50, batch=2, seq=12, docs_per_row=3).items()}
    np.testing.assert_array_equal(batch["segment_ids"][0], np.repeat([1, 2, 3], 4))
    np.testing.assert_array_equal(batch["positions"][1], np.tile(np.arange(4), 3))
    self.assertTrue(((batch["tokens"] >= 0) & (batch["tokens"] < 50)).all())
    self.assertGreater(len(np.unique(batch["tokens"])), 5)  # random, not constant
    one = random_batch(vocab_size=50, batch=2, seq=12)
    np.testing.assert_array_equal(np.asarray(one["positions"])[0], np.arange(12))
    np.testing.assert_array_equal(np.asarray(one["segment_ids"]), 1)


if __name__ == "__main__":
  absltest.main()
