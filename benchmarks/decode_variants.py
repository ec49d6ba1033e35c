"""The variants `benchmarks/decode.py` times: an execution and the kernel settings it runs under.

Variants (--variants, each `name` or `name+key=value...`):
  reference  Execution(grouped_matmul="xla"): what `generate` ran before it resolved its execution
             (lax.ragged_dot experts everywhere);
  auto       Execution() as `generate` resolves it for the device (Pallas experts on GPUs);
  options    gmm=<auto|xla|pallas|tokamax>, attn=<xla|cudnn> (Execution fields), small=module (small
             batches through the training path, not inference/experts.py's kernels), gu=/dn=NxKxWxS
             (its gate-up / down tiles: block_n, block_k, num_warps, num_stages), lhs=weights (its
             products with the weight tile as the dot's left operand), dense=kernel (dense
             MLPs and shared experts through inference/streamed_matmul.py's split-K kernel,
             `inference.experts.dense_ffn`), proj=kernel (the attention projections through it too,
             `inference.attention.STREAMED_PROJECTIONS`), route=kernel (a decode step's routing as
             inference/route_kernel.py's kernel, `inference.experts.ROUTE_KERNEL`), q=int8 (the model
             through `inference.quantize(model, "int8")`: int8 weights, compute in --dtype), pad=N (the
             decode loop's MLP widths a multiple of N, 0: as stored; `experts.DECODE_MLP_MULTIPLE`),
             sort=<argsort|counting> (the dropless layout of small steps; `COUNTING_SORT_MAX`),
             xla=<flag>:<value> (an XLA option for the prefill and decode compiles only, e.g.
             xla=xla_gpu_enable_triton_gemm:false; repeatable).
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import jax

from inference import experts

# Options that switch a module constant: (key, value) → (module, constant, value while the row runs).
_SWITCHES = {("small", "module"): ("inference.experts", "SMALL_ROWS_PER_EXPERT", -1),
             ("dense", "kernel"): ("inference.experts", "SMALL_DENSE_KERNEL", True),
             ("proj", "kernel"): ("inference.attention", "STREAMED_PROJECTIONS", True),
             ("route", "kernel"): ("inference.experts", "ROUTE_KERNEL", True),
             ("sort", "argsort"): ("models.experts", "COUNTING_SORT_MAX", 0)}
_KNOWN = "gmm=, attn=, small=, dense=, proj=, route=, lhs=, gu=, dn=, q=, pad=, sort=, xla="


def parse_grid(entry: str) -> tuple[int, int, int]:
  """'32x256x64' → (32, 256, 64)."""
  parts = entry.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"grid entry {entry!r} is not BxTxN with positive integers, e.g. 32x256x64")
  return tuple(int(p) for p in parts)


def parse_variant(spec: str) -> tuple[dict, dict]:
  """'auto+attn=cudnn+small=module' → (Execution fields, kernel settings for `experts_settings`)."""
  name, *options = spec.split("+")
  if name not in ("reference", "auto"):
    raise ValueError(f"unknown variant {spec!r}: expected reference or auto, then +key=value options")
  fields = {"grouped_matmul": "xla"} if name == "reference" else {}
  settings = {}
  for option in options:
    key, _, value = option.partition("=")
    if key == "gmm" and value:
      fields["grouped_matmul"] = value
    elif key == "attn" and value:
      fields["attention_impl"] = value
    elif (key, value) in _SWITCHES or (key, value) in (("lhs", "weights"), ("sort", "counting")):
      settings[key] = value
    elif key == "q" and value == "int8":
      settings["quantize"] = value
    elif key == "pad" and value.isdigit():
      settings["pad"] = int(value)
    elif key == "xla" and ":" in value:
      flag, _, setting = value.partition(":")
      setting = int(setting) if setting.isdigit() else {"true": True, "false": False}.get(setting, setting)
      settings.setdefault("xla", {})[flag] = setting
    elif key in ("gu", "dn") and len(value.split("x")) == 4:
      n, k, w, s = (int(v) for v in value.split("x"))
      settings[key] = dict(block_n=n, block_k=k, num_warps=w, num_stages=s)
    else:
      raise ValueError(f"unknown option {option!r} in variant {spec!r} (known: {_KNOWN})")
  return fields, settings


class experts_settings:  # pylint: disable=invalid-name
  """Applies a variant's kernel settings (module constants of inference/ and models/) for one row and
  restores them (and clears the jit caches) after; "quantize" and "xla" are applied by the caller."""

  def __init__(self, settings: dict):
    self.settings = settings
    self.patches = contextlib.ExitStack()

  def __enter__(self):
    if not set(self.settings) - {"quantize", "xla"}:
      return
    patch = lambda module, name, value: self.patches.enter_context(
        mock.patch.object(importlib.import_module(module), name, value))
    for key, value in self.settings.items():
      if isinstance(value, str) and (key, value) in _SWITCHES:
        patch(*_SWITCHES[key, value])
    if "pad" in self.settings:
      patch("inference.experts", "DECODE_MLP_MULTIPLE", self.settings["pad"])
    for key, name in (("gu", "gate_up"), ("dn", "down")):
      if key in self.settings:  # the tiles of whichever weights the variant runs
        for table in (experts.TILES, experts.INT8_TILES):
          self.patches.enter_context(mock.patch.dict(table, {name: self.settings[key]}))
    if self.settings.get("lhs") == "weights":
      for table in (experts.TILES, experts.INT8_TILES):
        self.patches.enter_context(mock.patch.dict(table, {name: dict(tiles, weights_lhs=True)
                                                           for name, tiles in table.items()}))
    jax.clear_caches()

  def __exit__(self, *exc):
    if not set(self.settings) - {"quantize", "xla"}:
      return
    self.patches.close()
    jax.clear_caches()
