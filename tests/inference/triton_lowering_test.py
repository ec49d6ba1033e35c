"""The Pallas kernels (generation's, and the training step's grouped matmuls) lower to Triton for a
Hopper GPU, on any machine.

Interpreted runs (the other tests) check what a kernel computes, not that Pallas's Triton lowering
accepts it: an unsupported op, layout or block shape only shows on a GPU. Lowering for the "cuda"
platform needs no GPU once Pallas is told which one to target (sm_90, stubbed through a private hook;
the test skips if that hook moves). The shapes are the bench model's (V2-Lite layers): decode at batch
32, training at 8 × 2048 tokens."""

import dataclasses
import unittest
from unittest import mock

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

from inference import experts, mla_decode, route_kernel, streamed_matmul
from models import grouped_matmul
from tests.inference import tiny_models

try:
  from jax._src import gpu_info as _gpu_info
  from jax._src.pallas.triton import pallas_call_registration as _registration
  _HOOK = _registration.gpu_info_lib
  _HOPPER = _gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
except (ImportError, AttributeError, TypeError):  # a jax whose private layout differs
  _HOOK = None

bf16, i8, f32, i32 = jnp.bfloat16, jnp.int8, jnp.float32, jnp.int32
S = jax.ShapeDtypeStruct
V2_LITE_ROUTER = dataclasses.replace(tiny_models.v2_lite_style(), n_routed_experts=64, num_experts_per_tok=6)
V3_ROUTER = dataclasses.replace(tiny_models.v3_style(), n_group=1, topk_group=1, n_routed_experts=256,
                                num_experts_per_tok=8)


def _experts(weights_lhs=False, int8=False):
  w = S((3, 64, 2048, 1408), i8 if int8 else bf16)
  scales = (S((3, 64, 1408), f32),) * 2 if int8 else ()
  tiles = dict(experts.tiles("gate_up", scales), weights_lhs=weights_lhs)
  f = lambda x, g, u, layer, sizes, *sc: experts.grouped_ffn(x, (g, u), layer, sizes, scales=sc or None, **tiles)
  return f, (S((192, 2048), bf16), w, w, S((1,), i32), S((64,), i32), *scales)


KERNELS = {
    "grouped_ffn": _experts(),
    "grouped_ffn_int8": _experts(int8=True),
    "grouped_ffn_int8_weights_lhs": _experts(weights_lhs=True, int8=True),
    "split_k_gate_up": (lambda x, g, u: streamed_matmul.split_k_products(x, (g, u), **experts.DENSE_TILES["gate_up"]),
                        (S((32, 2048), bf16), S((2048, 11008), bf16), S((2048, 11008), bf16))),
    "split_k_down_int8": (lambda h, w, s: streamed_matmul.split_k_products(h, (w,), (s,), **experts.DENSE_TILES["down"]),
                          (S((32, 11008), bf16), S((11008, 2048), i8), S((2048,), f32))),
    "split_k_projection": (lambda x, w: streamed_matmul.split_k_products(x, (w,), **streamed_matmul.PROJECTION_TILES),
                           (S((32, 2048), bf16), S((2048, 3072), bf16))),
    "route_v2_lite": (lambda logits: route_kernel.route(logits, None, V2_LITE_ROUTER), (S((64, 64), f32),)),
    "route_v3": (lambda logits, bias: route_kernel.route(logits, bias, V3_ROUTER), (S((32, 256), f32), S((256,), f32))),
    # the training step's grouped matmuls (models/grouped_matmul.py): a V2-Lite MoE layer at 8 × 2048 tokens
    "grouped_product": (lambda x, w, sizes: grouped_matmul.grouped_product(x, w, sizes, **grouped_matmul.TILES["product"]),
                        (S((98304, 2048), bf16), S((64, 2048, 2816), bf16), S((64,), i32))),
    "grouped_product_transposed": (
        lambda dy, w, sizes: grouped_matmul.grouped_product(dy, w, sizes, transpose_w=True, **grouped_matmul.TILES["product"]),
        (S((98304, 2816), bf16), S((64, 2048, 2816), bf16), S((64,), i32))),
    "weight_gradient": (lambda x, dy, sizes: grouped_matmul.weight_gradient(x, dy, sizes, bf16,
                                                                            **grouped_matmul.TILES["weight_gradient"]),
                        (S((98304, 2048), bf16), S((98304, 2816), bf16), S((64,), i32))),
    "mla_decode": (lambda q, qp, c, kp, lengths, cn, kpn: mla_decode.latent_attention(
        q, qp, c, kp, 1, lengths, cn, kpn, 0.1), (S((32, 1, 16, 512), bf16), S((32, 1, 16, 64), bf16),
                                                  S((3, 32, 320, 512), bf16), S((3, 32, 320, 64), bf16), S((32,), i32),
                                                  S((32, 1, 512), bf16), S((32, 1, 64), bf16))),
}


@unittest.skipIf(_HOOK is None, "this jax's Pallas Triton lowering has no gpu_info hook to stub")
class TritonLoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(*((name, name) for name in KERNELS))
  def test_lowers_for_hopper(self, name):
    f, args = KERNELS[name]
    with mock.patch.object(_HOOK, "get_gpu_info", lambda: _HOPPER):
      text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertIn("__gpu$xla.gpu.triton", text)


if __name__ == "__main__":
  absltest.main()
