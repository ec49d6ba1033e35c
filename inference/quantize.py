"""Weight-only int8 quantization of a model for generation and evaluation.

    from inference import generate, quantize
    model_int8 = quantize(model, "int8")   # a new model; `model` is unchanged
    out = generate(model_int8, input_ids, max_new_tokens=32)

Every matmul weight of the layers — attention projections, dense MLPs, shared and routed experts —
and MTP's projection becomes a `models.quantized.Int8Weight`: int8 values and a float32 scale per
output channel (per expert and layer for stacked weights). Compute stays in the model's dtype (bf16:
int8 is what HBM holds and what a decode step reads, converted as it is loaded). Kept as they are,
as weight-only int8 schemes commonly do: the output head (its rounding moves the logits of near-tied
tokens directly: on the tiny trained model, 32 greedy float32 tokens stayed identical for 87.5 % of
prompts with an int8 head and 92.2 % without; it is 1/75 of V2-Lite's bytes; `include_head=True`
quantizes it too), the embedding table (a lookup of B rows per step), the router (its float32 scores
pick the experts; 0.1 % of the bytes), norms and biases. The quantized model is for inference: its
matmuls carry no gradient, and it is not sharded or checkpointed.

Why not qwix: qwix 0.1.8's post-training quantization intercepts the matmuls of NNX modules and swaps
the weight for a quantized copy of the module's parameter. On this model that fails while tracing the
first call: the layer stacks run as one `lax.scan` over weights stacked [L, ...], so inside the scan
the weight qwix sees has one axis less than the parameter's sharding annotation (`AssertionError` in
qwix's `update_sharding`, shape (64, 4, 24) against ('layers', 'embed', 'heads', 'kv')); and the
routed experts of a decode step, 2/3 of its bytes, run in this project's own Pallas kernel
(`inference/experts.py`), where no matmul is left to intercept. So the int8 weights are a parameter
value type that `models.layers.matmul` and that kernel read directly.
"""

from __future__ import annotations

import jax
from flax import nnx

from models.quantized import Int8Weight, quantize_int8
from models.transformer import Transformer

METHODS = ("int8",)

# Parameter name → the axes (from the end) its matmul contracts: everything else is an output channel.
CONTRACTED = {"wq": (-3,), "wq_b": (-3,), "wkv_b": (-3,), "wo": (-3, -2)}
QUANTIZED = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "gate", "up", "down", "eh_proj"})
HEAD = "lm_head"


def quantize(model: Transformer, method: str = "int8", *, include_head: bool = False) -> Transformer:
  """A copy of `model` with its matmul weights in int8 (see the module docstring)."""
  if method not in METHODS:
    raise ValueError(f"unknown quantization {method!r}; expected one of {METHODS}")
  if not isinstance(model, Transformer):
    raise ValueError(f"quantize takes a models.Transformer, got {type(model).__name__}")
  model = nnx.clone(model)
  names = QUANTIZED | {HEAD} if include_head else QUANTIZED
  params = [(path, node) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param) and path and path[-1] in names]
  if not params:
    raise ValueError("the model has no matmul weights to quantize")
  for path, node in params:
    if isinstance(node.get_value(), Int8Weight):
      raise ValueError(f"{'/'.join(map(str, path))} is already quantized")
  contracted = tuple(CONTRACTED.get(path[-1], (-2,)) for path, _ in params)
  # One compiled call for every weight (op by op, each new shape would compile on its own).
  weights = jax.jit(lambda values: [quantize_int8(v, c) for v, c in zip(values, contracted)])(
      [node.get_value() for _, node in params])
  for (_, node), weight in zip(params, weights):
    node.set_value(weight)
  return model
