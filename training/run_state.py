"""A run's TrainState: its layout on the mesh, and where its first value comes from.

  rs = run_state.plan(config, model_cfg, tx, mesh)
  state = run_state.initial_state(rs, config, tx, mesh)        # when there is no checkpoint to resume
  state = run_state.attach_base(rs, restored, config, mesh)    # after a restore (LoRA: reload the base)

The first state is
- a random init (`config.seed`) when the run has no `init_from`;
- the `init_from` weights with a fresh optimizer at step 0 (full fine-tuning);
- with `config.lora.rank` > 0: fresh adapters (B = 0, so the model starts exactly as the source; A
  random, or along the base's gradient on the first batch with `lora.init = "gradient"`) over the
  source's frozen weights, held in `base_params` in `config.lora.base_dtype`. Only the adapters and
  their optimizer state are trained and checkpointed; a resumed LoRA run loads its base again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import sharding
from models import lora
from training import adapters
from training import step as step_lib
from training import weights
from training.state import ModelDef, TrainState, init_state


class RunState(NamedTuple):
  modeldef: ModelDef
  lora_cfg: lora.LoraConfig | None
  lora_plan: dict | None
  abstract: TrainState  # what a checkpoint holds (base_params {}), for restoring
  shardings: TrainState  # of the live state, base_params included: the train step's in/out shardings

  @property
  def checkpoint_shardings(self) -> TrainState:
    return self.shardings.replace(base_params={})


def plan(config, model_cfg: models.ModelConfig, tx: optax.GradientTransformation, mesh) -> RunState:
  """The abstract state and shardings of `config`'s run on `mesh` (nothing is allocated)."""
  rules = config.get("sharding_rules")
  modeldef = ModelDef.abstract(model_cfg)
  params_shardings = nnx.to_pure_dict(sharding.state_shardings(modeldef.params_template, mesh, rules))
  bias_shardings = nnx.to_pure_dict(sharding.state_shardings(modeldef.bias_template, mesh, rules))
  lora_cfg = adapters.lora_config(config)
  if lora_cfg is None:
    lora_plan, base_shardings = None, {}
    abstract = jax.eval_shape(lambda: init_state(model_cfg, tx, config.seed)[1])
    trained_shardings = params_shardings
  else:
    lora_plan = lora.plan(modeldef.params_template, lora_cfg)
    trained = adapters.abstract_adapters(lora_plan)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
                          router_bias=nnx.to_pure_dict(modeldef.bias_template),
                          opt_state=jax.eval_shape(tx.init, trained))
    trained_shardings, base_shardings = adapters.adapter_shardings(lora_plan, mesh, rules), params_shardings
  shardings = TrainState(step=NamedSharding(mesh, P()), params=trained_shardings, router_bias=bias_shardings,
                         opt_state=sharding.tree_shardings_like(trained_shardings, abstract.opt_state, mesh),
                         base_params=base_shardings)
  return RunState(modeldef, lora_cfg, lora_plan, abstract, shardings)


def initial_state(rs: RunState, config, tx: optax.GradientTransformation, mesh, *, first_batch=None,
                  execution: models.Execution | None = None) -> TrainState:
  """The state of step 0: a random init, or built on `config.init_from` (see the module docstring).
  A LoRA run with `lora.init = "gradient"` also needs the run's first batch (on the mesh) and execution:
  its A matrices follow the base's gradient on that batch (`lora.gradient_aligned`)."""
  model_cfg = rs.modeldef.cfg
  if not config.get("init_from"):
    return jax.jit(lambda: init_state(model_cfg, tx, config.seed)[1], out_shardings=rs.shardings)()
  params, bias = weights.load_source_weights(weights.parse_source(config.init_from), rs.modeldef, mesh,
                                             config.get("sharding_rules"))
  if rs.lora_cfg is None:
    start = lambda p, b: TrainState(step=jnp.zeros((), jnp.int32), params=p, router_bias=b, opt_state=tx.init(p))
    return jax.jit(start, out_shardings=rs.shardings)(params, bias)

  def start_lora(base, b, batch):
    trained = lora.init_adapters(rs.lora_plan, jax.random.key(config.seed))
    if batch is not None:
      grads = jax.grad(step_lib.make_loss(rs.modeldef, config, execution))(base, b, batch)
      trained = lora.gradient_aligned(rs.lora_plan, trained, grads)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trained, router_bias=b, opt_state=tx.init(trained),
                      base_params=_as_base(base, config))

  if rs.lora_cfg.init == "gradient" and first_batch is None:
    raise ValueError("lora.init = 'gradient' needs the run's first batch")
  with jax.set_mesh(mesh):
    return jax.jit(start_lora, out_shardings=rs.shardings)(
        params, bias, first_batch if rs.lora_cfg.init == "gradient" else None)


def attach_base(rs: RunState, state: TrainState, config, mesh) -> TrainState:
  """A restored checkpoint's state, completed: a LoRA run gets its frozen base from `init_from`."""
  if rs.lora_cfg is None:
    return state
  base, _ = weights.load_source_weights(weights.parse_source(config.init_from), rs.modeldef, mesh,
                                        config.get("sharding_rules"))
  base = jax.jit(lambda b: _as_base(b, config), out_shardings=rs.shardings.base_params)(base)
  return state.replace(base_params=base)


def _as_base(params: dict, config) -> dict:
  dtype = config.lora.get("base_dtype", "")
  return params if not dtype else jax.tree.map(lambda w: w.astype(dtype), params)


def param_counts(rs: RunState, state: TrainState) -> dict[str, int]:
  """`params/trainable` (what gets gradients) and `params/total` (the model's weights)."""
  trainable = lora.count_params(state.params)
  total = lora.count_params(state.base_params) if rs.lora_cfg is not None else trainable
  return {"params/trainable": trainable, "params/total": total}
