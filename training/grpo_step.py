"""The jitted pieces of a GRPO step: per-token log-probabilities of a rollout batch, and the policy update.

  logprobs = jax.jit(grpo_step.make_logprobs(modeldef, execution, temperature))
  logp_ref = logprobs(ref_params, ref_bias, batch)                                  # [N, S-1]
  update = jax.jit(grpo_step.make_update_step(modeldef, tx, schedule, config, execution),
                   static_argnames="first", donate_argnums=0)
  state, metrics, logp_old = update(state, batch, None, logp_ref, first=True)       # iteration 1 of μ
  state, metrics, _ = update(state, batch, logp_old, logp_ref, first=False)         # iterations 2..μ

Log-probabilities are those of the sampling distribution: logits / temperature, as the rollout drew
them. The first of the μ iterations takes its own log-probabilities (gradient stopped) as the rollout
policy's — they are computed by the same program on the same weights, so its ratio is exactly 1 — and
returns them for the later iterations, which saves a forward pass per step. `state.step` counts
rollout steps: it advances on the first iteration only (the optimizer's own count advances on each).

The policy's router biases stay as the source's during GRPO: the aux-loss-free bias rule would move
the policy outside the objective that the importance ratios account for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import models
from training import adapters
from training import grpo
from training import loss as loss_lib
from training.state import ModelDef, TrainState
from training.step import forward


def token_logprobs(logits_BTV, tokens_BT, temperature: float):
  """(log p(token t+1 | ≤ t) [B, T-1], entropy of that distribution [B, T-1]) at `temperature`, float32."""
  logits_BTV = logits_BTV[:, :-1].astype(jnp.float32) / temperature
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logits_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0] - logz_BT
  probs_BTV = jax.nn.softmax(logits_BTV, axis=-1)
  entropy_BT = logz_BT - jnp.sum(probs_BTV * logits_BTV, axis=-1)
  return logp_BT, entropy_BT


def completion_mask(batch: dict):
  """float32 [B, T-1]: the predictions of completion tokens (the rollout's loss_mask)."""
  return loss_lib.batch_target_mask(batch, 1, masked=True).astype(jnp.float32)


def make_logprobs(modeldef: ModelDef, execution: models.Execution, temperature: float):
  """logprobs(params, router_bias, batch) → float32 [B, T-1]: full model weights (no adapters)."""
  def logprobs(params, router_bias, batch):
    out = forward(modeldef, params, router_bias, batch, with_mtp=False, execution=execution)
    return token_logprobs(out.logits, batch["tokens"], temperature)[0]
  return logprobs


def make_update_step(modeldef: ModelDef, tx: optax.GradientTransformation, schedule, config,
                     execution: models.Execution):
  """update(state, batch, logp_old, logp_ref, *, first) → (state, metrics, logp_old). batch: a rollout's
  `update_batch` plus "advantages" [B]; logp_ref None when grpo.kl_beta is 0."""
  g = config.grpo
  lora_cfg = adapters.lora_config(config)
  eps, eps_high = float(g.clip_epsilon), float(g.clip_epsilon_high or g.clip_epsilon)
  beta, temperature, mu = float(g.kl_beta), float(g.temperature), int(g.num_iterations)
  dropout = lora_cfg is not None and lora_cfg.dropout > 0

  def update(state: TrainState, batch: dict, logp_old, logp_ref, *, first: bool):
    mask_BT = completion_mask(batch)
    adv_B = batch["advantages"]
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state.step) if dropout else None

    def loss_fn(params):
      full = adapters.model_params(params, state.base_params, lora_cfg, dropout_rng)
      out = forward(modeldef, full, state.router_bias, batch, with_mtp=False, execution=execution)
      logp_BT, entropy_BT = token_logprobs(out.logits, batch["tokens"], temperature)
      old_BT = jax.lax.stop_gradient(logp_BT) if first else logp_old
      loss = grpo.grpo_loss(logp_BT, old_BT, logp_ref, adv_B, mask_BT, clip_epsilon=eps, clip_epsilon_high=eps_high,
                            kl_beta=beta, aggregation=g.loss_aggregation)
      return loss, (jax.lax.stop_gradient(logp_BT), old_BT, entropy_BT)

    (loss, (logp_BT, old_BT, entropy_BT)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    policy = grpo.policy_metrics(logp_BT, old_BT, logp_ref, adv_B, mask_BT, clip_epsilon=eps,
                                 clip_epsilon_high=eps_high)
    tokens = jnp.maximum(jnp.sum(mask_BT), 1.0)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step * mu),
        "grpo/kl": policy["kl"],
        "grpo/clip_fraction": policy["clip_fraction"],
        "grpo/entropy": jnp.sum(entropy_BT * mask_BT) / tokens,
    }
    new_state = state.replace(step=state.step + (1 if first else 0), params=params, opt_state=opt_state)
    return new_state, metrics, old_BT

  return update
