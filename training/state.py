"""The functional training state: pure dicts of arrays in, pure dicts out.

A model is split once into its static graph and two variable collections — trainable parameters
(nnx.Param) and the aux-loss-free router biases (updated by a sign rule, not the optimizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import models
from models.router import RouterBias


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # nested dict of float32 master weights
  router_bias: dict  # nested dict of float32 selection biases (may be empty)
  opt_state: Any
  # LoRA runs (training/adapters.py): the frozen base weights; `params` then holds only the adapters.
  # Never checkpointed (the run's init_from names them); {} otherwise.
  base_params: dict = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Static structure to rebuild a Transformer from pure parameter dicts inside jit."""
  cfg: models.ModelConfig
  graphdef: Any
  params_template: nnx.State
  bias_template: nnx.State
  rest: nnx.State

  @classmethod
  def of(cls, model: models.Transformer) -> "ModelDef":
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    return cls(model.cfg, graphdef, params, bias, rest)

  @classmethod
  def abstract(cls, cfg: models.ModelConfig) -> "ModelDef":
    """From an abstract init of `Transformer(cfg)` (nothing is allocated)."""
    return cls.of(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))

  def merge(self, params: dict, router_bias: dict) -> models.Transformer:
    p, b = jax.tree.map(lambda x: x, self.params_template), jax.tree.map(lambda x: x, self.bias_template)
    nnx.replace_by_pure_dict(p, params)  # in place, on copies of the templates
    nnx.replace_by_pure_dict(b, router_bias)
    return nnx.merge(self.graphdef, p, b, self.rest)


def split_model(model: models.Transformer) -> tuple[ModelDef, dict, dict]:
  modeldef = ModelDef.of(model)
  return modeldef, nnx.to_pure_dict(modeldef.params_template), nnx.to_pure_dict(modeldef.bias_template)


def init_state(model_cfg: models.ModelConfig, tx: optax.GradientTransformation, seed: int):
  """(ModelDef, TrainState) for a fresh model. Call under jit with out_shardings for sharded init."""
  model = models.Transformer(model_cfg, rngs=nnx.Rngs(seed))
  modeldef, params, bias = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, router_bias=bias,
                     opt_state=tx.init(params))
  return modeldef, state
