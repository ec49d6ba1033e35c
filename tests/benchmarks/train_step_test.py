"""The benchmark's variant and mesh parsing, batch construction and collective accounting (the timing
itself runs on a GPU; tests/sharding/train_step_mesh_test.py runs the meshed step on fake CPU devices)."""

from absl.testing import absltest
import numpy as np

from benchmarks.train_step import collective_ms, parse_mesh, parse_variant, random_batch


class TrainStepBenchmarkTest(absltest.TestCase):

  def test_parse_variant(self):
    self.assertEqual(parse_variant("dropless"), {"moe_backend": "dropless"})
    self.assertEqual(parse_variant("capacity:1.25+remat=full+attn=cudnn"),
                     {"moe_backend": "capacity", "capacity_factor": 1.25, "remat_policy": "full",
                      "attention_impl": "cudnn"})
    self.assertEqual(parse_variant("dropless+moments=bfloat16"),
                     {"moe_backend": "dropless", "moment_dtype": "bfloat16"})
    self.assertEqual(parse_variant("dropless+logits=compute+unroll=true+lse=onepass+cast=true"),
                     {"moe_backend": "dropless", "logits_dtype": "compute", "unroll_layers": True,
                      "logsumexp": "onepass", "cast_weights_once": True})
    for bad in ("einsum", "capacity:1.0+remat", "dropless+heads=4", "dropless+unroll=yes", "dropless+lse=fast"):
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


  def test_parse_mesh(self):
    self.assertEqual(parse_mesh("expert=4+fsdp=2"), dict(data=1, fsdp=2, expert=4, tensor=1))
    self.assertEqual(parse_mesh("data=1"), dict(data=1, fsdp=1, expert=1, tensor=1))
    for bad in ("experts=4", "expert=0", "expert=-1", "expert"):
      with self.assertRaisesRegex(ValueError, "bad mesh entry"):
        parse_mesh(bad)

  def test_collective_ms_per_device_by_kernel_name(self):
    """NCCL and XLA kernel names on two GPUs' streams: all_to_all (send/recv included) and the other
    collectives, summed and split per device; host events and compute kernels are not counted."""
    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": n}}
            for p, n in ((1, "/device:GPU:0"), (2, "/device:GPU:1"), (3, "/host:CPU"))]
    kernels = [(1, "all-to-all-start.1", 300), (2, "ncclDevKernel_SendRecv", 500), (1, "all-reduce.3", 200),
               (2, "ncclDevKernel_ReduceScatter_Sum_bf16", 100), (1, "gemm_fusion_dot_4", 900),
               (3, "all-to-all-start.1", 7000)]
    events = meta + [{"ph": "X", "pid": p, "name": n, "ts": i, "dur": d} for i, (p, n, d) in enumerate(kernels)]
    got = collective_ms(events, num_devices=2)
    self.assertAlmostEqual(got["all_to_all"], 0.4)
    self.assertAlmostEqual(got["other collectives"], 0.15)


if __name__ == "__main__":
  absltest.main()
