"""The jitted train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from training import loss as loss_lib
from training.state import ModelDef, TrainState


def _forward(modeldef: ModelDef, params, router_bias, batch, with_mtp):
  model = modeldef.merge(params, router_bias)
  return model.forward(batch["tokens"], batch["positions"], batch["segment_ids"], with_mtp=with_mtp)


def update_router_bias(router_bias: dict, loads: dict, speed: float) -> dict:
  """Aux-loss-free balancing: bias_i += γ·sign(mean load − load_i), per MoE layer (global counts)."""
  def update(path, bias):
    load = loads[tuple(str(getattr(k, "key", k)) for k in path)]
    return bias + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return jax.tree_util.tree_map_with_path(update, router_bias)


def _bias_paths_to_loads(out) -> dict:
  loads = {}
  if "expert_load" in out.aux:
    loads[("moe_layers", "ffn", "router", "bias")] = out.aux["expert_load"]
  if out.mtp_aux is not None:
    loads[("mtp", "block", "ffn", "router", "bias")] = out.mtp_aux["expert_load"]
  return loads


def make_train_step(modeldef: ModelDef, tx: optax.GradientTransformation, schedule, config):
  """Returns train_step(state, batch) -> (state, metrics); batch arrays are [B, T]."""
  with_mtp = bool(config.model.get("mtp_depth", 0))
  accum = config.grad_accum_steps
  alpha, mtp_lambda, speed = config.loss.balance_alpha, config.loss.mtp_lambda, config.loss.bias_update_speed

  def train_step(state: TrainState, batch: dict):
    counts = loss_lib.step_counts(batch, with_mtp)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def micro_loss(params, mb):
      out = _forward(modeldef, params, state.router_bias, mb, with_mtp)
      terms = loss_lib.loss_terms(out, mb)
      loss = loss_lib.combine(terms, counts, accum, alpha=alpha, mtp_lambda=mtp_lambda)
      return loss, (terms, _bias_paths_to_loads(out))

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
    metrics = {
        "train/loss": loss,
        "train/ce": terms["ce_sum"] / jnp.maximum(counts["ce_count"], 1.0),
        "train/balance_loss": terms["balance"] / accum,
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
        "train/tokens": counts["ce_count"],
    }
    if with_mtp:
      metrics["train/mtp_ce"] = terms["mtp_sum"] / jnp.maximum(counts["mtp_count"], 1.0)
    for path, load in loads.items():
      frac = load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0)  # [L, E] or [E]
      metrics[f"moe/{path[0]}_load_fraction"] = frac
    new_state = state.replace(step=state.step + 1, params=params, router_bias=router_bias, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(modeldef: ModelDef, token_bytes):
  """eval_step(state, batch) -> sums of next-token NLL (nats), target bytes and targets."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)

  def eval_step(state: TrainState, batch: dict):
    out = _forward(modeldef, state.params, state.router_bias, batch, False)
    mask = loss_lib.target_mask(batch["segment_ids"], 1)
    nll = loss_lib.token_nll(out.logits[:, :-1], batch["tokens"][:, 1:])
    return {"nll_sum": jnp.sum(jnp.where(mask, nll, 0.0)),
            "bytes": jnp.sum(jnp.where(mask, token_bytes[batch["tokens"][:, 1:]], 0.0)),
            "count": jnp.sum(mask).astype(jnp.float32)}

  return eval_step
