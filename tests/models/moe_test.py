"""DeepSeekMoE routing invariants, numpy references for the router and experts, backend agreement."""

import functools
import math

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.execution import Execution
from models.experts import expert_capacity, permute_rows
from models.moe import MoE
from models.router import Router, Routing, expert_load, sequence_balance_loss
from tests.models import tiny_configs as tc

DROPLESS = Execution()

B, T = 2, 12
STYLE_PARAMS = [dict(testcase_name=name, style=name) for name in tc.STYLES]
GROUPED = [dict(testcase_name=name, style=name) for name in ("v3", "v2")]


def _router(cfg, seed=0):
  """A Router whose logits have std ≈ 2 on unit inputs (decisive but not saturated scores) and, for
  V3, a 0.1·N(0, 1) selection bias."""
  router = tc.materialize(lambda: Router(cfg, rngs=nnx.Rngs(0)), cfg, seed)
  router.kernel.set_value(router.kernel.get_value() * (2 / cfg.init_std / np.sqrt(cfg.hidden_size)))
  return router


def _inputs(cfg, seed=0, shape=(B, T)):
  return np.random.default_rng(seed).standard_normal(shape + (cfg.hidden_size,)).astype(np.float32)


def _np_scores(x, kernel, cfg):
  logits = x.astype(np.float64) @ np.asarray(kernel, np.float64)
  if cfg.score_func == "sigmoid":
    return 1 / (1 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_group_scores(choice_E, cfg):
  groups = choice_E.reshape(cfg.n_group, -1)
  if cfg.group_score == "top2_sum":
    return np.sort(groups, axis=-1)[:, -2:].sum(-1)
  return groups.max(-1)


def _np_route(scores, bias, cfg):
  """Reference router over [..., E] scores: (experts [..., k] sorted by id, weights in that order,
  smallest decision margin seen). Written per token with plain sorting."""
  lead = scores.shape[:-1]
  scores = scores.reshape(-1, cfg.n_routed_experts)
  per_group = cfg.n_routed_experts // cfg.n_group
  experts, weights, margin = [], [], np.inf
  for s in scores:
    choice = s + bias
    allowed = np.arange(cfg.n_routed_experts)
    if cfg.n_group > 1:
      g = _np_group_scores(choice, cfg)
      order = np.argsort(-g, kind="stable")
      margin = min(margin, g[order[cfg.topk_group - 1]] - g[order[cfg.topk_group]])
      allowed = np.concatenate([np.arange(per_group) + i * per_group for i in order[:cfg.topk_group]])
    ranked = allowed[np.argsort(-choice[allowed], kind="stable")]
    chosen = np.sort(ranked[:cfg.num_experts_per_tok])
    if len(ranked) > cfg.num_experts_per_tok:
      margin = min(margin, choice[ranked[cfg.num_experts_per_tok - 1]] - choice[ranked[cfg.num_experts_per_tok]])
    w = s[chosen]
    if cfg.norm_topk_prob:
      w = w / w.sum()
    experts.append(chosen)
    weights.append(w * cfg.routed_scaling_factor)
  k = cfg.num_experts_per_tok
  return np.array(experts).reshape(lead + (k,)), np.array(weights).reshape(lead + (k,)), margin


def _by_expert(routing: Routing):
  """Routing's (experts, weights) reordered by expert id, as numpy."""
  experts, weights = np.asarray(routing.experts_BTk), np.asarray(routing.weights_BTk)
  order = np.argsort(experts, axis=-1)
  return np.take_along_axis(experts, order, -1), np.take_along_axis(weights, order, -1)


def _silu(x):
  return x / (1 + np.exp(-x))


def _np_experts(x_ND, experts_Nk, weights_Nk, moe, kept_Nk=None):
  """Dense float64 loop over tokens and their chosen experts; `kept` masks dropped assignments."""
  gate, up, down = (np.asarray(w[...], np.float64) for w in (moe.experts.gate, moe.experts.up, moe.experts.down))
  out = np.zeros(x_ND.shape, np.float64)
  for n, x in enumerate(x_ND.astype(np.float64)):
    for j, e in enumerate(experts_Nk[n]):
      if kept_Nk is None or kept_Nk[n, j]:
        out[n] += weights_Nk[n, j] * ((_silu(x @ gate[e]) * (x @ up[e])) @ down[e])
  return out


def _fcfs_kept(experts_Nk, capacity):
  """Assignment (n, j) is kept iff fewer than `capacity` earlier assignments (token-major, then j)
  chose the same expert."""
  seen, kept = {}, np.zeros(experts_Nk.shape, bool)
  for n, j in np.ndindex(*experts_Nk.shape):
    e = experts_Nk[n, j]
    kept[n, j] = seen.get(e, 0) < capacity
    seen[e] = seen.get(e, 0) + 1
  return kept


@functools.cache
def _moe(style, **overrides):
  cfg = tc.STYLES[style](**overrides)
  return tc.materialize(lambda: MoE(cfg, rngs=nnx.Rngs(0)), cfg, seed=3)


def _capacity(capacity_factor):
  return Execution(moe_backend="capacity", capacity_factor=capacity_factor)


def _experts(moe, x_ND, routing, capacity_factor=None):
  """The routed experts on N tokens with routing over them; capacity backend when a factor is given."""
  experts_A, weights_A = routing.experts_BTk.reshape(-1), routing.weights_BTk.reshape(-1)
  capacity = None if capacity_factor is None else expert_capacity(capacity_factor, experts_A.shape[0],
                                                                  moe.cfg.n_routed_experts)
  return moe.experts(x_ND, experts_A, weights_A, capacity)


class RouterTest(chex.TestCase):

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_matches_numpy_reference(self, style):
    cfg = tc.STYLES[style]()
    router = _router(cfg)
    x = _inputs(cfg)
    routing = router(jnp.asarray(x))
    scores = _np_scores(x, router.kernel[...], cfg)
    np.testing.assert_allclose(routing.scores_BTE, scores, atol=1e-6, rtol=1e-6)
    bias = np.zeros(cfg.n_routed_experts) if router.bias is None else np.asarray(router.bias[...], np.float64)
    self.assertEqual(bool(np.any(bias)), cfg.router_bias)
    ref_experts, ref_weights, margin = _np_route(scores, bias, cfg)
    self.assertGreater(margin, 1e-5, "test inputs have near-tied routing decisions")
    experts, weights = _by_expert(routing)
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6, rtol=1e-6)

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_top_k_distinct_experts(self, style):
    cfg = tc.STYLES[style]()
    routing = _router(cfg, seed=1)(jnp.asarray(_inputs(cfg, seed=1)))
    experts = np.asarray(routing.experts_BTk)
    chex.assert_shape(experts, (B, T, cfg.num_experts_per_tok))
    self.assertEqual(experts.dtype, np.int32)
    self.assertTrue(np.all((experts >= 0) & (experts < cfg.n_routed_experts)))
    for row in experts.reshape(-1, cfg.num_experts_per_tok):
      self.assertLen(set(row.tolist()), cfg.num_experts_per_tok)
    self.assertTrue(np.all(np.asarray(routing.weights_BTk) > 0))

  @parameterized.named_parameters(*GROUPED)
  def test_chosen_experts_lie_in_best_groups(self, style):
    cfg = tc.STYLES[style]()
    router = _router(cfg, seed=2)
    routing = router(jnp.asarray(_inputs(cfg, seed=2)))
    choice = np.asarray(routing.scores_BTE, np.float64)
    if router.bias is not None:
      choice = choice + np.asarray(router.bias[...], np.float64)
    per_group = cfg.n_routed_experts // cfg.n_group
    groups_used = set()
    for c, chosen in zip(choice.reshape(-1, cfg.n_routed_experts), np.asarray(routing.experts_BTk).reshape(-1, cfg.num_experts_per_tok)):
      best = set(np.argsort(-_np_group_scores(c, cfg))[:cfg.topk_group].tolist())
      self.assertTrue(set((chosen // per_group).tolist()) <= best, (chosen, best))
      groups_used.add(frozenset(best))
    self.assertGreater(len(groups_used), 1, "every token kept the same groups: the test is vacuous")

  def test_bias_selects_but_weights_use_unbiased_scores(self):
    cfg = tc.v3_style()
    router = _router(cfg, seed=4)
    forced = 5
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    bias[forced] = 10.0
    router.bias.set_value(jnp.asarray(bias))
    x = _inputs(cfg, seed=4)
    routing = router(jnp.asarray(x))
    experts, weights = np.asarray(routing.experts_BTk), np.asarray(routing.weights_BTk, np.float64)
    self.assertTrue(np.all(np.any(experts == forced, axis=-1)), "the bias did not force the expert")
    scores = np.asarray(routing.scores_BTE, np.float64)
    # Without the bias the forced expert would often not be chosen.
    unbiased_topk = np.argsort(-scores, axis=-1)[..., :cfg.num_experts_per_tok]
    self.assertGreater(np.sum(~np.any(unbiased_topk == forced, axis=-1)), 0)
    chosen_scores = np.take_along_axis(scores, experts, -1)
    expected = scores[..., forced] * cfg.routed_scaling_factor / chosen_scores.sum(-1)
    np.testing.assert_allclose(weights[experts == forced].reshape(B, T), expected, rtol=1e-6)

  @parameterized.named_parameters(("v3", "v3", True), ("v2", "v2", False))
  def test_weight_sums(self, style, normalized):
    cfg = tc.STYLES[style]()
    routing = _router(cfg, seed=5)(jnp.asarray(_inputs(cfg, seed=5)))
    sums = np.asarray(routing.weights_BTk, np.float64).sum(-1)
    self.assertEqual(cfg.norm_topk_prob, normalized)
    if normalized:
      np.testing.assert_allclose(sums, cfg.routed_scaling_factor, rtol=1e-6)
    else:  # softmax top-k mass times the scale: below the scale, and varying by token
      self.assertTrue(np.all(sums < cfg.routed_scaling_factor))
      self.assertGreater(np.ptp(sums), 1e-3)


class BalanceStatsTest(chex.TestCase):

  def _np_balance(self, routing, valid, cfg):
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = np.asarray(routing.scores_BTE, np.float64)
    experts = np.asarray(routing.experts_BTk)
    losses = []
    for b in range(scores.shape[0]):
      rows = np.flatnonzero(valid[b])
      counts = np.bincount(experts[b, rows].reshape(-1), minlength=e)
      f = e / (k * len(rows)) * counts
      p = (scores[b, rows] / scores[b, rows].sum(-1, keepdims=True)).mean(0)
      losses.append(np.sum(f * p))
    return np.mean(losses)

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_sequence_balance_loss_matches_numpy(self, style):
    cfg = tc.STYLES[style]()
    routing = _router(cfg, seed=6)(jnp.asarray(_inputs(cfg, seed=6)))
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    ones = np.ones((B, T))
    np.testing.assert_allclose(sequence_balance_loss(routing, e, k), self._np_balance(routing, ones, cfg), rtol=1e-5)
    valid = ones.copy()
    valid[0, 7:] = 0  # padding at the end of the first sequence
    masked = sequence_balance_loss(routing, e, k, jnp.asarray(valid, jnp.float32))
    np.testing.assert_allclose(masked, self._np_balance(routing, valid, cfg), rtol=1e-5)
    self.assertNotAlmostEqual(float(masked), float(sequence_balance_loss(routing, e, k)), places=4)

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_sequence_balance_loss_sanity(self, style):
    """With equal scores for every expert (zero router kernel) P_i = 1/E and Σ f_i = E, so the loss is
    exactly 1 whichever experts are picked. For single-token sequences without a bias the chosen
    experts are the top-k of the normalised scores, whose mass is ≥ k/E, so the loss is ≥ 1."""
    cfg = tc.STYLES[style](router_bias=False)
    router = _router(cfg, seed=7)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = jnp.asarray(_inputs(cfg, seed=7))
    one_token = router(x.reshape(B * T, 1, -1))
    per_seq = [float(sequence_balance_loss(Routing(*(a[i:i + 1] for a in one_token)), e, k)) for i in range(B * T)]
    self.assertGreaterEqual(min(per_seq), 1 - 1e-6)
    self.assertGreater(max(per_seq), 1.01)
    router.kernel.set_value(jnp.zeros_like(router.kernel[...]))
    np.testing.assert_allclose(sequence_balance_loss(router(x), e, k), 1.0, rtol=1e-6)

  def test_expert_load(self):
    cfg = tc.v3_style()
    moe = _moe("v3")
    _, aux = moe(jnp.asarray(_inputs(cfg, seed=8)), DROPLESS)
    routing = moe.router(jnp.asarray(_inputs(cfg, seed=8)))
    load = np.asarray(aux["expert_load"])
    self.assertEqual(load.sum(), B * T * cfg.num_experts_per_tok)
    np.testing.assert_array_equal(load, np.bincount(np.asarray(routing.experts_BTk).ravel(), minlength=cfg.n_routed_experts))
    np.testing.assert_array_equal(expert_load(routing.experts_BTk, cfg.n_routed_experts), load)


class ExpertsTest(chex.TestCase):

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_dropless_matches_dense_numpy_reference(self, style):
    moe = _moe(style)
    cfg = moe.cfg
    x = jnp.asarray(_inputs(cfg, seed=9).reshape(B * T, -1))
    routing = moe.router(x[None])
    routing = Routing(*(a.reshape((B * T,) + a.shape[2:]) for a in routing))
    out = _experts(moe, x, routing)
    ref = _np_experts(np.asarray(x), np.asarray(routing.experts_BTk), np.asarray(routing.weights_BTk), moe)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(*STYLE_PARAMS)
  def test_capacity_with_ample_room_matches_dropless(self, style):
    cfg = tc.STYLES[style]()
    dropless = _moe(style)
    # capacity_factor E/k gives C = N slots per expert: no assignment can be dropped.
    ample = _capacity(cfg.n_routed_experts / cfg.num_experts_per_tok)
    x = jnp.asarray(_inputs(cfg, seed=10))
    chex.assert_trees_all_close(dropless(x, ample)[0], dropless(x, DROPLESS)[0], atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(("tiny", 0.01), ("half", 0.5), ("one", 1.0))
  def test_capacity_drops_first_come_first_served(self, capacity_factor):
    moe = _moe("v3")
    cfg = moe.cfg
    n, k, e = B * T, cfg.num_experts_per_tok, cfg.n_routed_experts
    x = jnp.asarray(_inputs(cfg, seed=11).reshape(n, -1))
    routing = moe.router(x[None])
    routing = Routing(*(a.reshape((n,) + a.shape[2:]) for a in routing))
    experts, weights = np.asarray(routing.experts_BTk), np.asarray(routing.weights_BTk)
    kept = _fcfs_kept(experts, max(1, math.ceil(capacity_factor * n * k / e)))
    self.assertFalse(kept.all(), "nothing was dropped: the test is vacuous")
    out = np.asarray(_experts(moe, x, routing, capacity_factor))
    np.testing.assert_allclose(out, _np_experts(np.asarray(x), experts, weights, moe, kept), atol=1e-5, rtol=1e-5)
    dropless = np.asarray(_experts(moe, x, routing))
    changed = np.abs(out - dropless).max(-1) > 1e-4
    np.testing.assert_array_equal(changed, ~kept.all(-1))
    np.testing.assert_array_equal(out[~kept.any(-1)], 0.0)  # fully dropped tokens get no routed output

  def test_permute_rows_gradient_is_the_gather_gradient(self):
    # A partial injection: 5 of 8 output rows take distinct input rows, 3 take none (index 7 = out of range).
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
    index = jnp.asarray([3, 7, 0, 5, 7, 6, 1, 7], jnp.int32)
    inverse = jnp.full((8,), 8, jnp.int32).at[index].set(jnp.arange(8, dtype=jnp.int32))[:7]
    weights = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    loss = lambda f: (lambda x: jnp.sum(jnp.sin(f(x)) * weights))
    ours = loss(lambda x: permute_rows(x, index, inverse))
    plain = loss(lambda x: x.at[index].get(mode="fill", fill_value=0))
    np.testing.assert_array_equal(ours(x), plain(x))
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)
    self.assertTrue(np.all(np.asarray(jax.grad(ours)(x))[[2, 4]] == 0))  # rows no output took

  @parameterized.named_parameters(("ample", None), ("dropping", 0.5))
  def test_capacity_gradients(self, capacity_factor):
    cfg = tc.STYLES["v3"]()
    ample = cfg.n_routed_experts / cfg.num_experts_per_tok
    moe = _moe("v3")
    n = B * T
    x = jnp.asarray(_inputs(cfg, seed=14).reshape(n, -1))
    routing = moe.router(x[None])
    routing = Routing(*(a.reshape((n,) + a.shape[2:]) for a in routing))
    g = jnp.asarray(np.random.default_rng(14).standard_normal(x.shape), jnp.float32)
    loss = lambda cf, x: jnp.sum(_experts(moe, x, routing, cf) * g)
    dx = jax.grad(lambda x: loss(capacity_factor or ample, x))(x)
    if capacity_factor is None:  # nothing dropped: the same gradient as the dropless backend
      np.testing.assert_allclose(dx, jax.grad(lambda x: loss(None, x))(x), rtol=1e-5, atol=1e-5)
    else:  # with drops: against central finite differences along a random direction
      direction = jnp.asarray(np.random.default_rng(15).standard_normal(x.shape), jnp.float32)
      eps = 1e-3
      fd = (loss(capacity_factor, x + eps * direction) - loss(capacity_factor, x - eps * direction)) / (2 * eps)
      np.testing.assert_allclose(jnp.sum(dx * direction), fd, rtol=2e-3)

  def test_whole_model_backends_agree(self):
    cfg = tc.v3_style(mtp_depth=0)  # the MTP block is one more MoE block: left out to save compiles
    ids = tc.random_ids(cfg, (B, T), seed=12)
    model = tc.build(cfg, seed=0)
    dropless = tc.forward(model, ids)
    capacity = tc.forward(model, ids, execution=_capacity(cfg.n_routed_experts / cfg.num_experts_per_tok))
    chex.assert_trees_all_close(capacity.logits, dropless.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(capacity.aux["expert_load"], dropless.aux["expert_load"])


if __name__ == "__main__":
  absltest.main()
