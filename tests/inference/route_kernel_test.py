"""inference/route_kernel.py, interpreted (CPU), against the Router and sort_by_expert it replaces."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from inference import route_kernel
from models import experts as experts_lib
from models.router import Router
from tests.inference import tiny_models

CONFIGS = {
    # softmax scores, no bias, weights as scored (V2-Lite's router), 6 of 20 experts (not a power of two)
    "v2_lite": dataclasses.replace(tiny_models.v2_lite_style(), n_routed_experts=20, num_experts_per_tok=6),
    # sigmoid scores + selection bias, normalised and scaled weights (V3's router without groups)
    "v3": dataclasses.replace(tiny_models.v3_style(), n_group=1, topk_group=1, n_routed_experts=16,
                              num_experts_per_tok=4),
}


class RouteTest(parameterized.TestCase):

  @parameterized.product(style=("v2_lite", "v3"), tokens=(5, 40))
  def test_matches_the_router_and_the_layout(self, style, tokens):
    cfg = CONFIGS[style]
    router = Router(cfg, rngs=nnx.Rngs(1))
    if router.bias is not None:
      router.bias.set_value(0.1 * jax.random.normal(jax.random.key(2), router.bias.shape))
    x_ND = jax.random.normal(jax.random.key(3), (1, tokens, cfg.hidden_size))
    want = router(x_ND)
    bias = None if router.bias is None else router.bias[...]
    weights, experts, sizes, position = route_kernel.route(router.logits(x_ND)[0], bias, cfg, interpret=True)
    np.testing.assert_array_equal(experts, want.experts_BTk[0])
    np.testing.assert_allclose(weights, want.weights_BTk[0], rtol=1e-6, atol=1e-7)
    want_sizes, _, want_position = experts_lib.sort_by_expert(want.experts_BTk.reshape(-1), cfg.n_routed_experts)
    np.testing.assert_array_equal(sizes, want_sizes)
    np.testing.assert_array_equal(position, want_position)

  def test_ties_pick_the_lower_expert_as_top_k_does(self):
    cfg = CONFIGS["v2_lite"]
    logits = jnp.zeros((3, cfg.n_routed_experts)).at[:, 7].set(1.0)  # every other expert tied
    _, experts, _, _ = route_kernel.route(logits, None, cfg, interpret=True)
    np.testing.assert_array_equal(experts, [[7, 0, 1, 2, 3, 4]] * 3)

  def test_unsupported_routers_fail_clearly(self):
    grouped = tiny_models.v3_style()  # n_group 4
    self.assertFalse(route_kernel.supported(grouped, 4))
    self.assertFalse(route_kernel.supported(CONFIGS["v3"], route_kernel.MAX_TOKENS + 1))
    with self.assertRaisesRegex(ValueError, "without expert groups"):
      route_kernel.route(jnp.zeros((4, grouped.n_routed_experts)), None, grouped, interpret=True)


if __name__ == "__main__":
  absltest.main()
