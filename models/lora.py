"""LoRA as a low-rank update of the weights themselves: W' = W + (alpha / rank) · A·B.

The update is computed on the pure parameter dicts (`training.state.ModelDef`) before the model is
merged, so every matmul path sees it unchanged: the custom-VJP einsums, the `lax.scan` over stacked
layers and the gathered / ragged routed-expert matmuls. Leading 'layers' and 'expert' axes are batch
axes: each layer of a stack and each routed expert has its own (A, B) pair.

For a weight, the axes after the stacked ones are split into "in" and "out" groups: when the last axis
is 'embed' (output projections: wo [H, Kv, D], down [F, D]) out is that axis and in the others;
otherwise in is the first axis and out the rest (wq_a [D, Rq], wkv_b [R, H, K], gate [D, F]). Then

  A: [*stack, *in, r]    B: [*stack, r, *out]    ΔW = Σ_r A·B: [*stack, *in, *out]

A starts like PEFT's default (kaiming-uniform with a = √5: uniform(±1/√in_size)), B at zero, so a fresh
adapter leaves every weight bit for bit as it was (W + 0.0: only a -0.0 entry would turn into +0.0).
`gradient_aligned` instead points A along the top singular directions of a first batch's gradient
(B still zero), which a trainer selects with `lora.init = "gradient"`.

Dropout differs from PEFT: PEFT drops the adapter's *input activations*, which has no weight-space
form. Here `dropout` is rank dropout: with an rng, each rank component of each adapter (per stacked
layer / expert) is dropped with probability p and the kept ones are scaled by 1 / (1 - p); one draw per
call (a train step), shared by the whole batch. No rng (eval, `merge`) means no dropout.

Cost: the merged weight is materialised every step, so the backward pass still computes the full-size
weight gradient dW' and contracts it to dA, dB; LoRA saves optimizer state, not matmul FLOPs. With a
bf16 base the merged weight stays float32; a bf16 *compute* dtype rounds it to bf16 in each matmul, so
an update below W's bf16 resolution is lost in the forward pass (gradients still reach A and B).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import string
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Regexes searched in '/'-joined parameter paths. The default: attention projections, dense MLPs and
# shared experts, in the main stacks and the MTP block. WITH_ROUTED_EXPERTS adds every routed expert
# (one adapter pair per expert: E times the adapter parameters of a shared expert). Neither touches
# embed, lm_head, norms, the router kernel or mtp/eh_proj; WITH_EMBEDDINGS adds embed and lm_head.
DEFAULT_TARGETS = r"(^|/)attn/(wq|wq_a|wq_b|wkv_a|wkv_b|wo)$|(^|/)ffn/(shared/)?(gate|up|down)$"
WITH_ROUTED_EXPERTS = r"(^|/)attn/(wq|wq_a|wq_b|wkv_a|wkv_b|wo)$|(^|/)ffn/((shared|experts)/)?(gate|up|down)$"
# DEFAULT_TARGETS plus the token embedding and the output head: a small vocabulary's head is cheap to adapt
# and, on a task the base never saw, it is where full fine-tuning moves the weights most.
WITH_EMBEDDINGS = DEFAULT_TARGETS + r"|^embed$|^lm_head$"

INITS = ("random", "gradient")

# Leading logical axes that index independent weights (one adapter pair each).
STACKED_AXES = ("layers", "expert")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int  # r: the inner dimension of A·B
  alpha: float  # ΔW is scaled by alpha / rank
  dropout: float = 0.0  # rank dropout probability (see the module docstring), in [0, 1)
  targets: str = DEFAULT_TARGETS  # regex searched (re.search) in '/'-joined parameter paths
  init: str = "random"  # A's start: random (PEFT's default) | gradient (`gradient_aligned`)

  def __post_init__(self):
    r, alpha, p = self.rank, self.alpha, self.dropout
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
      raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
      raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
      raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {p!r}")
    if self.init not in INITS:
      raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
    if not isinstance(self.targets, str) or not self.targets:
      raise ValueError(f"LoraConfig.targets must be a non-empty regex string, got {self.targets!r}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"LoraConfig.targets is not a valid regex ({e}): {self.targets!r}") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
    """From a dict or ConfigDict; keys that are not fields (e.g. a trainer's base_dtype) are ignored."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """The adapter pair of one weight: shapes and logical axis names (None on the rank axis)."""
  keys: tuple  # the weight's keys in the params dict
  weight_shape: tuple[int, ...]
  weight_axes: tuple[str | None, ...]
  n_stack: int  # leading 'layers' / 'expert' axes
  n_in: int  # then the in axes; the remaining ones are out
  rank: int

  @property
  def in_size(self) -> int:
    return math.prod(self.weight_shape[self.n_stack:self.n_stack + self.n_in])

  @property
  def a_shape(self) -> tuple[int, ...]:
    return (*self.weight_shape[:self.n_stack + self.n_in], self.rank)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return (*self.weight_shape[:self.n_stack], self.rank, *self.weight_shape[self.n_stack + self.n_in:])

  @property
  def a_axes(self) -> tuple[str | None, ...]:
    return (*self.weight_axes[:self.n_stack + self.n_in], None)

  @property
  def b_axes(self) -> tuple[str | None, ...]:
    return (*self.weight_axes[:self.n_stack], None, *self.weight_axes[self.n_stack + self.n_in:])


def path_str(keys) -> str:
  return "/".join(str(k) for k in keys)


def _key(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _split_axes(axes) -> tuple[int, int] | None:
  """(n_stack, n_in) for a weight with logical `axes`, or None if it has < 2 non-stacked axes."""
  n_stack = 0
  while n_stack < len(axes) and axes[n_stack] in STACKED_AXES:
    n_stack += 1
  rest = axes[n_stack:]
  if len(rest) < 2:
    return None
  return n_stack, (len(rest) - 1 if rest[-1] == "embed" else 1)


def plan(params_template: nnx.State, cfg: LoraConfig) -> dict[str, AdapterSpec]:
  """The adapters of `cfg`, keyed by '/'-path, for every parameter whose path matches
  `re.search(cfg.targets, path)` (search, not fullmatch) and that has at least two axes besides its
  leading 'layers' / 'expert' ones (biases and norm scales never get adapters)."""
  flat = jax.tree_util.tree_flatten_with_path(params_template, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  pattern, specs, paths = re.compile(cfg.targets), {}, []
  for key_path, leaf in flat:
    keys = tuple(_key(k) for k in key_path)
    path = path_str(keys)
    paths.append(path)
    shape = tuple(leaf.shape)
    meta = leaf.get_metadata() if isinstance(leaf, nnx.Variable) else {}
    axes = tuple(meta.get("out_sharding") or meta.get("sharding_names") or (None,) * len(shape))
    split = _split_axes(axes)
    if split is None or not pattern.search(path):
      continue
    specs[path] = AdapterSpec(keys, shape, axes, *split, cfg.rank)
  if not specs:
    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(f"LoRA targets {cfg.targets!r} match no parameter with two or more non-stacked axes; "
                     f"parameter paths look like: {shown}")
  return specs


def _nest(adapter_plan: dict[str, AdapterSpec], leaf_fn) -> dict:
  out = {}
  for path, spec in adapter_plan.items():
    node = out
    for k in spec.keys[:-1]:
      node = node.setdefault(k, {})
    node[spec.keys[-1]] = leaf_fn(path, spec)
  return out


def init_adapters(adapter_plan: dict[str, AdapterSpec], key, dtype=jnp.float32) -> dict:
  """Fresh adapters nested like the params dict: {'a': [*stack, *in, r], 'b': [*stack, r, *out]} at
  each targeted weight. A ~ uniform(±1/√in_size) (PEFT's default), B = 0."""
  def init(path, spec):
    bound = 1.0 / math.sqrt(spec.in_size)
    a = jax.random.uniform(_fold(key, path), spec.a_shape, jnp.float32, -bound, bound).astype(dtype)
    return {"a": a, "b": jnp.zeros(spec.b_shape, dtype)}
  return _nest(adapter_plan, init)


def gradient_aligned(adapter_plan: dict[str, AdapterSpec], adapters: dict, grads: dict) -> dict:
  """`adapters` with each A replaced by the top-r left singular vectors of its weight's gradient `grads`
  (a params-shaped dict, e.g. ∂loss/∂W on a first batch), per stacked layer / expert, scaled to the
  column norm of the default init (√(1/3)); B stays 0, so the model is still exactly the base.

  Why: with B = 0, B's first gradient is s·Aᵀ·G, the gradient projected on A's columns. Random
  columns keep ~r/in of G's energy; G's own top singular directions keep the most any rank-r A can,
  so the first steps move ΔW = s·A·B along the best rank-r approximation of the full fine-tuning
  step (the idea of LoRA-GA, Wang et al. 2024, without its residual base: W stays untouched)."""
  def init(path, spec):
    g = _at(grads, spec.keys).astype(jnp.float32)
    stack, rank = spec.weight_shape[:spec.n_stack], spec.rank
    g = g.reshape(*stack, spec.in_size, -1)
    u, _, _ = jnp.linalg.svd(g, full_matrices=False)  # [*stack, in, min(in, out)]
    a = u[..., :rank]
    if a.shape[-1] < rank:  # fewer singular directions than the rank: the rest keep their random init
      a = jnp.concatenate([a, _at(adapters, spec.keys)["a"].reshape(*stack, spec.in_size, rank)[..., a.shape[-1]:]],
                          axis=-1)
    dtype = _at(adapters, spec.keys)["a"].dtype
    return {"a": (a * math.sqrt(1.0 / 3.0)).reshape(spec.a_shape).astype(dtype), "b": _at(adapters, spec.keys)["b"]}
  return _nest(adapter_plan, init)


def _at(tree: Mapping, keys):
  for k in keys:
    tree = tree[k]
  return tree


def adapter_axes(adapter_plan: dict[str, AdapterSpec]) -> dict:
  """Logical axis names nested like `init_adapters`: {'a': (...), 'b': (...)} tuples."""
  return _nest(adapter_plan, lambda path, spec: {"a": spec.a_axes, "b": spec.b_axes})


def _fold(key, path: str):
  """A key of its own per adapter, stable when other targets are added or removed."""
  return jax.random.fold_in(key, np.uint32(zlib.crc32(path.encode())))


def _is_adapter(node) -> bool:
  return isinstance(node, Mapping) and set(node) == {"a", "b"} and not isinstance(node["a"], Mapping)


def _map(base: Mapping, adapters: Mapping, fn, keys=()) -> dict:
  """{k: fn(path, weight, adapter)} nested like `adapters`, each adapter beside its base weight."""
  out = {}
  for k, node in adapters.items():
    if not isinstance(base, Mapping) or k not in base:
      raise ValueError(f"adapter {path_str((*keys, k))!r} has no weight in the base params")
    path = (*keys, k)
    out[k] = fn(path_str(path), base[k], node) if _is_adapter(node) else _map(base[k], node, fn, path)
  return out


def _replace(base: Mapping, new: Mapping) -> dict:
  """`base` with the leaves of `new` (a nested sub-dict of it) swapped in; the rest are base's own."""
  out = dict(base)
  for k, node in new.items():
    out[k] = _replace(base[k], node) if isinstance(node, Mapping) else node
  return out


def _n_stack(path: str, w, a, b) -> int:
  """How many leading stacked axes an adapter pair has, checked against its weight's shape."""
  n_stack = a.ndim + b.ndim - 2 - w.ndim
  n_in = a.ndim - 1 - n_stack
  ok = n_stack >= 0 and n_in >= 1 and a.shape[-1] == b.shape[n_stack] and a.shape[:n_stack] == b.shape[:n_stack] \
      and (*a.shape[:-1], *b.shape[n_stack + 1:]) == tuple(w.shape)
  if not ok:
    raise ValueError(f"adapter {path!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not factor its weight "
                     f"{tuple(w.shape)}")
  return n_stack


def delta(a, b, n_stack: int):
  """ΔW = Σ_r A·B in float32 at full precision: [*stack, *in, r] × [*stack, r, *out] → [*stack, *in, *out].
  One einsum, no reshapes, so the stacked / in / out axes keep their shardings."""
  n_in, n_out = a.ndim - 1 - n_stack, b.ndim - 1 - n_stack
  letters = iter(string.ascii_letters.replace("r", ""))
  stack, ins, outs = ("".join(next(letters) for _ in range(n)) for n in (n_stack, n_in, n_out))
  return jnp.einsum(f"{stack}{ins}r,{stack}r{outs}->{stack}{ins}{outs}", a.astype(jnp.float32),
                    b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def rank_dropout(base: dict, adapters: dict, p: float, rng) -> dict:
  """`adapters` with each rank component of each adapter (per stacked layer / expert) dropped with
  probability p: A's column set to 0, or scaled by 1 / (1 - p) when kept. `base` gives the layouts."""
  def drop(path, w, adapter):
    a, b = adapter["a"], adapter["b"]
    n_stack = _n_stack(path, w, a, b)
    keep_SR = jax.random.bernoulli(_fold(rng, path), 1.0 - p, (*a.shape[:n_stack], a.shape[-1]))
    keep = keep_SR.reshape(*a.shape[:n_stack], *(1,) * (a.ndim - n_stack - 1), a.shape[-1])
    return {"a": jnp.where(keep, a / (1.0 - p), jnp.zeros_like(a)).astype(a.dtype), "b": b}
  return _map(base, adapters, drop)


def apply(base: dict, adapters: dict, cfg: LoraConfig, *, dropout_rng=None) -> dict:
  """The full params dict with each adapted weight W replaced by W + scale·A·B in float32 (a bf16 base
  is not rounded back to bf16, which would erase updates below its resolution); every other leaf is
  base's own object. With `dropout_rng` and cfg.dropout > 0 the
  adapters first go through `rank_dropout`. jit- and grad-friendly: gradients reach A and B."""
  if dropout_rng is not None and cfg.dropout > 0:
    adapters = rank_dropout(base, adapters, cfg.dropout, dropout_rng)

  def updated(path, w, adapter):
    a, b = adapter["a"], adapter["b"]
    if a.shape[-1] != cfg.rank:
      raise ValueError(f"adapter {path!r} has rank {a.shape[-1]}, the config says {cfg.rank}")
    d = delta(a, b, _n_stack(path, w, a, b))
    return w.astype(jnp.float32) + cfg.scale * d
  return _replace(base, _map(base, adapters, updated))


def merge(base: dict, adapters: dict, cfg: LoraConfig) -> dict:
  """The merged weights W + scale·A·B, without dropout (for export and evaluation)."""
  return apply(base, adapters, cfg)


def count_params(tree) -> int:
  """Total number of elements of the arrays (or ShapeDtypeStructs) in `tree`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
