"""The jitted train step: a pure function of (state, batch).

One step function serves every objective: `pretrain` trains on every next token, `sft` only on the
batch's `loss_mask` tokens (training/loss.py). A LoRA run (training/adapters.py) differentiates only
the adapters in `state.params` and runs the model on base + scale·A·B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import models
from training import adapters
from training import loss as loss_lib
from training import optimizer as optim_lib
from training.state import ModelDef, TrainState


def cast_matmul_weights(params: dict, dtype) -> dict:
  """`params` with the floating weight matrices (`optimizer.is_matrix`) in `dtype`, except the embedding
  table and the routers' kernels: the weights the model reads only as compute-dtype matmul operands
  (models/layers.py `matmul`, the experts' grouped matmuls). The embedding's gradient is a scatter-add
  of many rows and the router runs in float32, so both stay as they are."""
  def cast(path, leaf):
    names = [optim_lib.leaf_name(k) for k in path]
    keep = (not optim_lib.is_matrix(path, leaf) or not jnp.issubdtype(leaf.dtype, jnp.floating)
            or names[-1] == "embed" or "router" in names)
    return leaf if keep else leaf.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def forward(modeldef: ModelDef, params, router_bias, batch, *, with_mtp: bool, execution: models.Execution):
  """The model rebuilt from pure dicts, run on a packed batch {tokens, positions, segment_ids}
  (`execution.cast_weights_once`: on `cast_matmul_weights(params)`)."""
  if execution.cast_weights_once:
    params = cast_matmul_weights(params, modeldef.cfg.dtype)
  model = modeldef.merge(params, router_bias)
  return model.forward(batch["tokens"], batch["positions"], batch["segment_ids"], with_mtp=with_mtp,
                       execution=execution)


def update_router_bias(router_bias: dict, loads: dict, speed: float) -> dict:
  """Aux-loss-free balancing: bias_i += γ·sign(mean load − load_i), per MoE layer (global counts).

  loads: `ModelOutput.expert_loads()`, keyed by the top-level module owning each router bias."""
  def update(path, bias):
    load = loads[str(getattr(path[0], "key", path[0]))]
    return bias + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return jax.tree_util.tree_map_with_path(update, router_bias)


def is_masked(config) -> bool:
  """Whether the run's objective trains only on the batches' `loss_mask` tokens: supervised fine-tuning,
  and sequence distillation, which is SFT on a teacher's completions (its steps see the config with the
  teacher's sft_jsonl data, training/loop.py; its config.json keeps the prompt data, which eval.py then
  scores unmasked)."""
  objective = config.get("objective", "pretrain")
  return objective == "sft" or (objective == "distill" and config.data.get("dataset") == "sft_jsonl")


def distill_kl_sum(student_logits_BTV, teacher_logits_BTV, mask_BT, temperature: float):
  """Σ over masked tokens of KL(softmax(teacher / τ) ‖ softmax(student / τ)), float32."""
  s_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  t_BTV = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  kl_BT = jnp.sum(jnp.exp(t_BTV) * (t_BTV - s_BTV), axis=-1)
  return jnp.sum(jnp.where(mask_BT, kl_BT, 0.0))


def make_loss(modeldef: ModelDef, config, execution: models.Execution | None = None):
  """loss(params, router_bias, batch) → the run's training loss of one batch on full model weights
  (what a step differentiates, without accumulation; LoRA's gradient init differentiates the base)."""
  execution = models.Execution() if execution is None else execution
  with_mtp, masked = bool(modeldef.cfg.mtp_depth), is_masked(config)

  def loss(params, router_bias, batch):
    out = forward(modeldef, params, router_bias, batch, with_mtp=with_mtp, execution=execution)
    counts = loss_lib.step_counts(batch, with_mtp, masked)
    return loss_lib.combine(loss_lib.loss_terms(out, batch, masked), counts, 1, alpha=config.loss.balance_alpha,
                            mtp_lambda=config.loss.mtp_lambda)
  return loss


def make_train_step(modeldef: ModelDef, tx: optax.GradientTransformation, schedule, config,
                    execution: models.Execution | None = None, teacher: ModelDef | None = None):
  """Returns train_step(state, batch, teacher_weights=None) -> (state, metrics); batch arrays are [B, T].
  execution: how the model runs (default `models.Execution()`; the run's comes from
  `sharding.make_execution`). teacher: logits distillation (training/distill.py); then teacher_weights =
  (params, router_bias) of the frozen teacher, and the CE term becomes
  alpha · τ² · KL(teacher ‖ student) + (1 − alpha) · CE over the same target tokens."""
  execution = models.Execution() if execution is None else execution
  with_mtp = bool(modeldef.cfg.mtp_depth)
  accum = config.grad_accum_steps
  alpha, mtp_lambda, speed = config.loss.balance_alpha, config.loss.mtp_lambda, config.loss.bias_update_speed
  masked = is_masked(config)
  lora_cfg = adapters.lora_config(config)
  dropout = lora_cfg is not None and lora_cfg.dropout > 0

  if teacher is not None:
    tau, kd_alpha = float(config.distill.temperature), float(config.distill.alpha)

  def train_step(state: TrainState, batch: dict, teacher_weights=None):
    counts = loss_lib.step_counts(batch, with_mtp, masked)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state.step) if dropout else None

    def micro_loss(params, mb):
      full = adapters.model_params(params, state.base_params, lora_cfg, dropout_rng)
      out = forward(modeldef, full, state.router_bias, mb, with_mtp=with_mtp, execution=execution)
      terms = loss_lib.loss_terms(out, mb, masked)
      if teacher is not None:
        t_out = forward(teacher, *teacher_weights, mb, with_mtp=False, execution=execution)
        kl_mask = loss_lib.shifted_mask(loss_lib.batch_target_mask(mb, 1, masked), out.logits.shape[1])
        kl_sum = distill_kl_sum(out.logits, jax.lax.stop_gradient(t_out.logits), kl_mask, tau)
        terms["kl_sum"], terms["ce_only_sum"] = kl_sum, terms["ce_sum"]
        terms["ce_sum"] = kd_alpha * tau ** 2 * kl_sum + (1.0 - kd_alpha) * terms["ce_sum"]
      loss = loss_lib.combine(terms, counts, accum, alpha=alpha, mtp_lambda=mtp_lambda)
      return loss, (terms, out.expert_loads())

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, grad_fn(state.params, mb)), None

    first = jax.tree.map(lambda x: x[0], micro)
    if accum == 1:  # no accumulator: zeros + g would cost a full pass over the gradients
      (loss, (terms, loads)), grads = grad_fn(state.params, first)
    else:
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, state.params, first))
      ((loss, (terms, loads)), grads), _ = jax.lax.scan(body, zeros, micro)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    router_bias = update_router_bias(state.router_bias, loads, speed) if state.router_bias else state.router_bias
    ce_sum = terms["ce_only_sum"] if teacher is not None else terms["ce_sum"]
    metrics = {
        "train/loss": loss,
        "train/ce": ce_sum / jnp.maximum(counts["ce_count"], 1.0),
        "train/balance_loss": terms["balance"] / accum,
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
        "train/tokens": counts["ce_count"],
    }
    if teacher is not None:
      metrics["distill/kl"] = terms["kl_sum"] / jnp.maximum(counts["ce_count"], 1.0)
    if with_mtp:
      metrics["train/mtp_ce"] = terms["mtp_sum"] / jnp.maximum(counts["mtp_count"], 1.0)
    for stack, load in loads.items():  # [L, E] or [E] counts; the metrics writer turns them into stats
      metrics[f"moe/{stack}/expert_load"] = load
    new_state = state.replace(step=state.step + 1, params=params, router_bias=router_bias, opt_state=opt_state)
    return new_state, metrics

  return train_step
