"""The dropless experts' grouped matmuls on one GPU, at the bench model's MoE shapes.

  python -m benchmarks.grouped_matmul                     # kernels, expert FFN fwd+bwd, checks
  python -m benchmarks.grouped_matmul --train_step        # ... and the train step, dropless vs capacity

One MoE layer of configs/bench_v2lite_4l.py at batch 8 x 2048: A = 98304 assignments (6 per token) over
E = 64 experts, D = 2048, F = 1408, bf16, group sizes from top-6 routing over mildly imbalanced expert
probabilities (the same draw everywhere). Prints, with the median of --repeats timed calls after a
warm-up (each call blocked on):
  1. each kernel alone (models/grouped_matmul.py): the product and the input's gradient through
     tokamax's Mosaic kernel (its own tiling and --tokamax_configs) and the Pallas `grouped_product`
     (--product_configs), the weight gradient through the Pallas `weight_gradient`
     (--weight_grad_configs) and tokamax's Mosaic kernel, and the capacity backend's batched einsums
     for scale; with --adopt_fastest the fastest Pallas tilings are used from then on;
  2. the routed-expert FFN, forward + backward w.r.t. the rows and the three weights: capacity 1.0,
     dropless with each GPU grouped matmul, and with gate and up as two grouped matmuls instead of one;
     each dropless variant is checked against the capacity backend with room for every assignment
     (relative error, bf16);
  3. with --train_step: `benchmarks.train_step` variants (dropless with each GPU grouped matmul,
     capacity 1.0), cuDNN attention, and with --profile_dir a trace of the first (dropless) one.
--json writes every figure with the device, versions and the Pallas tilings used.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import models
from configs import bench_v2lite_4l
from models import experts as experts_lib
from models import grouped_matmul as gmm_lib

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per kernel (the median is reported).")
_TRAIN_STEP = flags.DEFINE_bool("train_step", False, "Also time the train step (benchmarks.train_step).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per variant.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Trace one dropless train step here.")
_JSON = flags.DEFINE_string("json", "", "Write the results here.")
_TOKAMAX_CONFIGS = flags.DEFINE_list(
    "tokamax_configs", ["128:64:128:4:1:1:8"],
    "Tilings for tokamax's Mosaic kernel: block_m:block_n:block_k:num_stages:persistent:grid_minor_dim:"
    "grid_tile_width.")
_PRODUCT_CONFIGS = flags.DEFINE_list(
    "product_configs", ["128:256:64:8:3", "128:256:64:8:4", "128:256:32:8:4", "256:128:64:8:3"],
    "Tilings for grouped_product: block_m:block_n:block_k:num_warps:num_stages.")
_WEIGHT_GRAD_CONFIGS = flags.DEFINE_list(
    "weight_grad_configs", ["128:256:32:8:4", "128:256:64:8:4"],
    "Tilings for weight_gradient: block_m:block_n:block_k:num_warps:num_stages.")
_ADOPT = flags.DEFINE_bool("adopt_fastest", True, "Sections 2-3 use the fastest Pallas tilings of section 1.")

A_TOKENS, K_ROUTED, E, D, F = 8 * 2048, 6, 64, 2048, 1408


def timed(f, *args) -> float:
  """Median milliseconds of f(*args) (jitted, blocked on) after one warm-up call."""
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def routing(seed: int = 0):
  """Expert ids [A] (token-major, 6 distinct per token) from mildly imbalanced probabilities."""
  rng = np.random.default_rng(seed)
  logits = np.log(rng.dirichlet(np.full(E, 8.0)))
  scores = logits + rng.gumbel(size=(A_TOKENS, E))
  return jnp.asarray(np.argsort(-scores, axis=1)[:, :K_ROUTED].reshape(-1), jnp.int32)


def _tokamax_config(spec: str) -> dict:
  bm, bn, bk, stages, persistent, minor, width = (int(v) for v in spec.split(":"))
  return dict(block_m=bm, block_n=bn, block_k=bk, num_stages=stages, split_k=1, persistent=bool(persistent),
              grid_minor_dim=minor, grid_tile_width=width)


def _pallas_tiles(spec: str) -> dict:
  bm, bn, bk, warps, stages = (int(v) for v in spec.split(":"))
  return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def kernels(x_SD, sizes_E, weights, rows: list) -> None:
  """Section 1: each grouped product alone (bf16 operands, already sorted)."""
  gate_up = jnp.concatenate(weights[:2], axis=-1).astype(jnp.bfloat16)  # [E, D, 2F]
  down = weights[2].astype(jnp.bfloat16)
  a = x_SD.shape[0]
  h_SF = jax.random.normal(jax.random.key(1), (a, F), jnp.bfloat16)
  dgu_S2F = jax.random.normal(jax.random.key(2), (a, 2 * F), jnp.bfloat16)
  dy_SD = jax.random.normal(jax.random.key(3), (a, D), jnp.bfloat16)

  def row(name, tflop, ms):
    rows.append({"section": "kernel", "name": name, "ms": ms, "tflops": tflop / ms * 1e3})
    print(f"  {name:58s} {ms:8.3f} ms {tflop / ms * 1e3:7.0f} TFLOP/s", flush=True)
    return ms

  t_gu, t_down = 2 * a * D * 2 * F / 1e12, 2 * a * F * D / 1e12
  fwd = lambda x, w: gmm_lib._tokamax_ragged_dot(x, w, sizes_E)  # pylint: disable=protected-access
  for spec in [None, *_TOKAMAX_CONFIGS.value]:
    gmm_lib.TOKAMAX_CONFIG = None if spec is None else _tokamax_config(spec)
    label = "tokamax default" if spec is None else f"tokamax {spec}"
    try:
      row(f"gate_up fwd [A,D]x[E,D,2F] ({label})", t_gu, timed(fwd, x_SD, gate_up))
      row(f"down fwd [A,F]x[E,F,D] ({label})", t_down, timed(fwd, h_SF, down))
      row(f"gate_up dx [A,2F]x[E,2F,D] ({label})", t_gu,
          timed(lambda g, w: fwd(g, jnp.swapaxes(w, 1, 2)), dgu_S2F, gate_up))
      row(f"down dx [A,D]x[E,D,F] ({label})", t_down,
          timed(lambda g, w: fwd(g, jnp.swapaxes(w, 1, 2)), dy_SD, down))
    except Exception as e:  # noqa: BLE001 - a tiling the kernel rejects: report and go on
      print(f"  {label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
  gmm_lib.TOKAMAX_CONFIG = None
  totals = {}
  for spec in _PRODUCT_CONFIGS.value:
    tiles = _pallas_tiles(spec)
    p = lambda x, w, t=False: gmm_lib.grouped_product(x, w, sizes_E, transpose_w=t, **tiles)
    try:
      totals[spec] = sum([
          row(f"gate_up fwd pallas {spec}", t_gu, timed(p, x_SD, gate_up)),
          row(f"down fwd pallas {spec}", t_down, timed(p, h_SF, down)),
          row(f"gate_up dx pallas {spec}", t_gu, timed(lambda g, w: p(g, w, True), dgu_S2F, gate_up)),
          row(f"down dx pallas {spec}", t_down, timed(lambda g, w: p(g, w, True), dy_SD, down))])
    except Exception as e:  # noqa: BLE001
      print(f"  grouped_product {spec}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
  if totals and _ADOPT.value:
    gmm_lib.TILES["product"] = _pallas_tiles(min(totals, key=totals.get))
  totals = {}
  for spec in _WEIGHT_GRAD_CONFIGS.value:
    wg = functools.partial(gmm_lib.weight_gradient, **_pallas_tiles(spec))
    try:
      totals[spec] = sum([
          row(f"gate_up dW pallas {spec}", t_gu,
              timed(lambda x, g: wg(x, g, sizes_E, jnp.bfloat16), x_SD, dgu_S2F)),
          row(f"down dW pallas {spec}", t_down,
              timed(lambda h, g: wg(h, g, sizes_E, jnp.bfloat16), h_SF, dy_SD))])
    except Exception as e:  # noqa: BLE001
      print(f"  weight_gradient {spec}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
  if totals and _ADOPT.value:
    gmm_lib.TILES["weight_gradient"] = _pallas_tiles(min(totals, key=totals.get))
  print(f"  Pallas tilings used from here on: {gmm_lib.TILES}")
  contract = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                               lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  tk_wg = lambda x, g: gmm_lib._tokamax().ragged_dot_general(  # pylint: disable=protected-access
      x, g, sizes_E, contract, preferred_element_type=jnp.bfloat16, implementation="mosaic")
  row("gate_up dW tokamax mosaic", t_gu, timed(tk_wg, x_SD, dgu_S2F))
  c = a // E
  buf = x_SD[:E * c].reshape(E, c, D)
  row(f"capacity einsum ecd,edf->ecf (C={c}, 2F)", t_gu,
      timed(lambda b, w: jnp.einsum("ecd,edf->ecf", b, w), buf, gate_up))
  row(f"capacity einsum ecd,ecf->edf (weight grad, 2F)", t_gu,
      timed(lambda b, g: jnp.einsum("ecd,ecf->edf", b, g), buf, dgu_S2F[:E * c].reshape(E, c, 2 * F)))


def _unfused_dropless(cfg, weights, x_AD, experts_A, grouped):
  """models.experts' dropless path with gate and up as two grouped matmuls (for comparison)."""
  gate, up, down = weights
  sizes, source, position = experts_lib.sort_by_expert(experts_A, gate.shape[0])
  gmm = lambda x, w: gmm_lib.grouped_matmul(x, w, sizes, grouped, cfg.dtype)
  x_SD = experts_lib.permute_rows(x_AD.astype(cfg.dtype), source, position)
  h_SF = jax.nn.silu(gmm(x_SD, gate)) * gmm(x_SD, up)
  return experts_lib.permute_rows(gmm(h_SF, down), position, source)


def expert_ffn_section(cfg, x_AD, ids_A, weights, rows: list) -> None:
  """Section 2: the routed-expert FFN forward + backward, and the agreement checks."""
  g_AD = jax.random.normal(jax.random.key(4), x_AD.shape, jnp.float32)
  max_load = int(jnp.max(jnp.bincount(ids_A, length=E)))

  def value_and_grads(ffn):  # every array an argument: nothing large is baked into the program
    def f(x, w, ids, g):
      loss = lambda x, w: jnp.sum(ffn(x, w, ids).astype(jnp.float32) * g)
      return ffn(x, w, ids), jax.grad(loss, argnums=(0, 1))(x, w)
    return f

  flops = 3 * 2 * x_AD.shape[0] * 3 * D * F / 1e12
  args = (x_AD, weights, ids_A, g_AD)
  ffn = lambda **kw: (lambda x, w, ids: experts_lib.expert_ffn(cfg, w, x, ids, **kw))
  reference = jax.jit(value_and_grads(ffn(capacity=max_load)))(*args)
  variants = {
      "capacity 1.0": (ffn(capacity=x_AD.shape[0] // E), {}),
      "dropless pallas (fused gate/up)": (ffn(grouped="pallas"), {}),
      "dropless pallas (gate, up separate)":
          (lambda x, w, ids: _unfused_dropless(cfg, w, x, ids, "pallas"), {}),
      "dropless tokamax (default tiling)": (ffn(grouped="tokamax"), {}),
  }
  for spec in _TOKAMAX_CONFIGS.value:
    variants[f"dropless tokamax {spec}"] = (ffn(grouped="tokamax"), {"TOKAMAX_CONFIG": _tokamax_config(spec)})
  for name, (run, settings) in variants.items():
    saved = {k: getattr(gmm_lib, k) for k in settings}
    for k, v in settings.items():
      setattr(gmm_lib, k, v)
    try:
      f = value_and_grads(run)
      ms = timed(f, *args)
      errors = {}
      if name.startswith("dropless"):
        out = jax.jit(f)(*args)
        labels = ("y", "dx", "dgate", "dup", "ddown")
        for label, a, b in zip(labels, jax.tree.leaves(out), jax.tree.leaves(reference)):
          a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
          finite = np.all(np.isfinite(a))
          errors[label] = float(np.linalg.norm(a - b) / np.linalg.norm(b)) if finite else float("nan")
      rows.append({"section": "expert_ffn", "name": name, "ms": ms, "tflops": flops / ms * 1e3,
                   "rel_err": errors})
      err = " ".join(f"{k} {v:.1e}" for k, v in errors.items())
      print(f"  {name:58s} {ms:8.2f} ms {flops / ms * 1e3:6.0f} TFLOP/s  {err}", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    finally:
      for k, v in saved.items():
        setattr(gmm_lib, k, v)


def train_step_section(rows: list) -> None:
  """Section 3: the real train step (benchmarks.train_step), dropless vs capacity."""
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel

  config = bench_v2lite_4l.get_config()
  batch = train_step.random_batch(config.model.vocab_size, 8, 2048)
  tuned = {"TOKAMAX_CONFIG": _tokamax_config(_TOKAMAX_CONFIGS.value[0])} if _TOKAMAX_CONFIGS.value else {}
  variants = [("dropless+attn=cudnn+gmm=pallas", {}, _PROFILE_DIR.value),
              ("capacity:1.0+attn=cudnn", {}, ""),
              ("dropless+attn=cudnn+gmm=tokamax", {}, ""),
              (f"dropless+attn=cudnn+gmm=tokamax ({_TOKAMAX_CONFIGS.value[:1]})", tuned, "")]
  for spec, settings, profile in variants:
    saved = {k: getattr(gmm_lib, k) for k in settings}
    for k, v in settings.items():
      setattr(gmm_lib, k, v)
    try:
      r = train_step.time_variant(config, train_step.parse_variant(spec.split(" ")[0]), batch, 3, _STEPS.value,
                                  profile)
    except Exception as e:  # noqa: BLE001
      r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    finally:
      for k, v in saved.items():
        setattr(gmm_lib, k, v)
    r.update(section="train_step", name=spec)
    rows.append(r)
    print(json.dumps(r), flush=True)
    jax.clear_caches()


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main(argv):
  del argv
  device = jax.devices()[0]
  versions = {name: _version(name) for name in ("jax", "jaxlib", "flax", "tokamax")}
  print(f"{device.device_kind} | {versions} | A={A_TOKENS * K_ROUTED} E={E} D={D} F={F} bf16")
  cfg = models.from_dict(bench_v2lite_4l.get_config().model.to_dict())
  shape = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok)
  assert shape == (D, F, E, K_ROUTED), shape
  ids_A = routing()
  sizes_E, source_S, position_A = experts_lib.sort_by_expert(ids_A, E)
  loads = np.asarray(sizes_E)
  print(f"group sizes: min {loads.min()} mean {loads.mean():.0f} max {loads.max()}")
  rng = np.random.default_rng(0)
  x_AD = jnp.asarray(rng.standard_normal((A_TOKENS * K_ROUTED, D)), jnp.float32)
  weights = tuple(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
                  for s in ((E, D, F), (E, D, F), (E, F, D)))
  rows: list = []
  print("1. kernels (one MoE layer)")
  kernels(experts_lib.permute_rows(x_AD.astype(jnp.bfloat16), source_S, position_A), sizes_E, weights, rows)
  print("2. routed-expert FFN forward + backward (x and 3 weights); rel. error vs capacity with room for all")
  expert_ffn_section(cfg, x_AD, ids_A, weights, rows)
  if _TRAIN_STEP.value:
    print("3. train step, configs/bench_v2lite_4l.py, batch 8 x 2048")
    train_step_section(rows)
  print("\n| section | variant | ms | TFLOP/s or tokens/s |\n|---|---|---|---|")
  for r in rows:
    if r["section"] == "train_step":
      value = f"{r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else r.get("error", "")
      print(f"| train step | {r['name']} | {r.get('step_ms_median', float('nan')):.1f} | {value} |")
    else:
      print(f"| {r['section']} | {r['name']} | {r['ms']:.3f} | {r['tflops']:.0f} |")
  if _JSON.value:
    with open(_JSON.value, "w") as out:
      # Output paths are where this machine wrote files, not part of what was measured.
      args = [a.split("=")[0] if a.startswith("--profile_dir") else a for a in sys.argv[1:]
              if not a.startswith("--json")]
      json.dump({"command": " ".join(["python -m benchmarks.grouped_matmul", *args]),
                 "device": device.device_kind,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "versions": versions, "pallas_tiles": gmm_lib.TILES, "rows": rows}, out, indent=1)


if __name__ == "__main__":
  app.run(main)
