"""GRPO in the one training loop: each step rolls out, scores, and updates the policy (objective = grpo).

  trainer = GrpoTrainer(config, rs, tx, schedule, mesh, execution, tokenizer)
  state, metrics = trainer.step(state, step)     # what training/loop.py calls for step 1, 2, ...
  scalars = trainer.evaluate(state)              # eval/accuracy, eval/reward_mean: greedy, held-out prompts

One step (DeepSeekMath's GRPO, the R1-Zero recipe):
1. take `prompts_per_step` prompts (training/rollout.py: a pure function of seed and step) and sample
   `group_size` completions of each with the project's `generate` at `temperature` / `top_p`;
2. score each completion with the configured rule-based rewards (training/rewards.py);
3. advantages relative to the group (training/grpo.py: `group_advantages`);
4. log-probabilities of the frozen reference model (the init_from weights; a LoRA run's own base)
   when kl_beta > 0;
5. `num_iterations` optimizer steps on the clipped objective (training/grpo_step.py).

Metrics per step: grpo/reward_mean, grpo/reward_std, grpo/reward/<name>, grpo/accuracy (the mean of the
correctness rewards), grpo/kl, grpo/clip_fraction, grpo/entropy, grpo/completion_length,
grpo/zero_std_groups (the fraction of groups whose rewards are all equal: no learning signal), and
perf/rollout_s / perf/update_s (host wall time of the two halves).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data import prompts as prompts_lib
from data import tokenizers
from models import lora
from training import grpo
from training import grpo_step
from training import rewards as rewards_lib
from training import rollout
from training import run_state
from training import weights
from training.state import TrainState


def rollout_batch_size(config) -> int:
  return int(config.grpo.prompts_per_step) * int(config.grpo.group_size)


def config_problems(config, batch_shards: int) -> list[str]:
  """What is wrong with a grpo run's own settings (checked before anything compiles)."""
  problems = []
  try:
    rewards_lib.parse(config.grpo.rewards)
  except ValueError as e:
    problems.append(f"grpo.rewards: {e}")
  n = rollout_batch_size(config)
  if n % batch_shards:
    problems.append(f"grpo.prompts_per_step * grpo.group_size = {n} rollouts do not split over the {batch_shards} "
                    "batch shards of the mesh")
  return problems


class GrpoTrainer:

  def __init__(self, config, rs: run_state.RunState, tx, schedule, mesh, execution,
               tokenizer: tokenizers.Tokenizer, batch_sharding):
    g = config.grpo
    self.config, self.rs, self.mesh, self.execution = config, rs, mesh, execution
    self.tokenizer, self.batch_sharding = tokenizer, batch_sharding
    self.group_size, self.per_step = int(g.group_size), int(g.prompts_per_step)
    self.rewards = rewards_lib.parse(g.rewards)
    template = config.data.get("prompt_template", prompts_lib.DEFAULT_TEMPLATE)
    self.train_prompts = rollout.encode_prompts(prompts_lib.load_prompts(config.data, "train"), tokenizer, template)
    self.eval_prompts = None
    if g.eval_prompts:
      self.eval_prompts = rollout.encode_prompts(
          prompts_lib.load_prompts(config.data, "validation", int(g.eval_prompts)), tokenizer, template)
    self.tokens_per_step = rollout_batch_size(config) * (self.train_prompts.ids.shape[1] + int(g.max_new_tokens))
    self.ref = self._reference() if float(g.kl_beta) > 0 else None
    with jax.set_mesh(mesh):
      self._update = jax.jit(grpo_step.make_update_step(rs.modeldef, tx, schedule, config, execution),
                             static_argnames="first", donate_argnums=0)
      self._logprobs = jax.jit(grpo_step.make_logprobs(rs.modeldef, execution, float(g.temperature)))
      self._merge = jax.jit(lambda base, a: lora.merge(base, a, rs.lora_cfg)) if rs.lora_cfg else None
    logging.info("grpo: %d train prompts, %d eval prompts, rollout batch %d x %d tokens", len(self.train_prompts),
                 0 if self.eval_prompts is None else len(self.eval_prompts), rollout_batch_size(config),
                 self.train_prompts.ids.shape[1] + int(g.max_new_tokens))

  def _reference(self):
    """(params, router_bias) of the frozen reference policy: the init_from weights."""
    if self.rs.lora_cfg is not None:
      return None  # the run's own base_params (adapters off) are the reference
    source = weights.parse_source(self.config.init_from)
    return weights.load_source_weights(source, self.rs.modeldef, self.mesh, self.config.get("sharding_rules"))

  def _policy(self, state: TrainState):
    full = self._merge(state.base_params, state.params) if self._merge else state.params
    return self.rs.modeldef.merge(full, state.router_bias)

  def _sample_key(self, step: int):
    return jax.random.fold_in(jax.random.key(self.config.seed), step)

  def step(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """Rollout step `step` (1-based, as the loop counts)."""
    g = self.config.grpo
    t0 = time.perf_counter()
    indices = np.repeat(rollout.step_indices(step - 1, self.per_step, len(self.train_prompts), self.config.seed),
                        self.group_size)
    with jax.set_mesh(self.mesh):
      out = rollout.sample(self._policy(state), self.train_prompts, indices, self.tokenizer,
                           max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
                           top_p=float(g.top_p), key=self._sample_key(step), execution=self.execution)
    records = [self.train_prompts.records[i] for i in indices]
    texts = [self.train_prompts.texts[i] for i in indices]
    total, per_name, correct = rewards_lib.score(self.rewards, texts, out.completions, records)
    advantages = grpo.group_advantages(jnp.asarray(total), self.group_size, scale=bool(g.scale_rewards))
    batch = {**rollout.update_batch(out), "advantages": np.asarray(advantages, np.float32)}
    rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.batch_sharding.spec[0]))
    batch = jax.device_put(batch, {k: rows if k == "advantages" else self.batch_sharding for k in batch})
    t1 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      logp_ref = None
      if float(g.kl_beta) > 0:
        ref_params, ref_bias = self.ref if self.ref is not None else (state.base_params, state.router_bias)
        logp_ref = self._logprobs(ref_params, ref_bias, batch)
      logp_old = None
      for iteration in range(int(g.num_iterations)):
        state, metrics, logp_old = self._update(state, batch, logp_old, logp_ref, first=iteration == 0)
      metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    groups = total.reshape(-1, self.group_size)
    metrics.update({
        "grpo/reward_mean": float(total.mean()),
        "grpo/reward_std": float(total.std()),
        "grpo/completion_length": float(out.num_generated.mean()),
        "grpo/zero_std_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),
        "perf/rollout_s": t1 - t0,
        "perf/update_s": t2 - t1,
        **{f"grpo/reward/{name}": float(v.mean()) for name, v in per_name.items()},
    })
    if correct is not None:
      metrics["grpo/accuracy"] = float(correct.mean())
    return state, metrics

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Greedy completions of the held-out prompts: eval/reward_mean and eval/accuracy."""
    if self.eval_prompts is None:
      return {}
    batch = rollout_batch_size(self.config)
    n = len(self.eval_prompts)
    totals, corrects = [], []
    with jax.set_mesh(self.mesh):
      model = self._policy(state)
      for start in range(0, n, batch):
        chunk = np.arange(start, min(start + batch, n))
        indices = np.concatenate([chunk, np.full(batch - len(chunk), chunk[0])])  # one shape: compiles once
        out = rollout.sample(model, self.eval_prompts, indices, self.tokenizer,
                             max_new_tokens=int(self.config.grpo.max_new_tokens), temperature=0.0,
                             key=self._sample_key(0), execution=self.execution)
        k = len(chunk)
        total, _, correct = rewards_lib.score(self.rewards, [self.eval_prompts.texts[i] for i in chunk],
                                              out.completions[:k], [self.eval_prompts.records[i] for i in chunk])
        totals.append(total)
        corrects.append(correct if correct is not None else np.full(k, np.nan))
    scalars = {"eval/reward_mean": float(np.concatenate(totals).mean())}
    if not np.isnan(corrects[0]).all():
      scalars["eval/accuracy"] = float(np.concatenate(corrects).mean())
    return scalars
