"""Times generation on one device: prefill, then cached greedy decode steps, against the HBM roofline.

  python -m benchmarks.decode                                     # configs/bench_v2lite_4l.py, bf16 weights
  python -m benchmarks.decode --grid=32x256x64,64x1024x32 --caches=latent,expanded --variants=reference,auto
  python -m benchmarks.decode --tiny                              # a CPU-sized smoke run of the same code

For every grid entry BxTxN (batch, prompt length, new tokens), cache kind and variant: prefill of B
random prompts of T tokens (jitted `inference.prefill` into a fresh cache of T + N slots), then N
greedy `inference.decode_step`s in one compiled loop (as `generate` runs them). Each is timed on the
device (block_until_ready; the median of --repeats after --warmup untimed runs; the decode loop
starts from a copy of the same prefilled cache every time). Reported: prefill tokens/s, decode ms per
step (loop time / N) and tokens/s (B per step), and the step's HBM roofline: the bytes a decode step
must read (`decode_bytes`: every weight once, except that only B rows of the embedding table are
read and a routed expert only if some token picks it, in expectation under uniform routing; MTP
excluded; plus the valid cache, T + (N-1)/2 positions on average) over the device's memory bandwidth
(BANDWIDTH by device kind, or --bandwidth). Weights are random (the config's init, non-zero), in
--dtype; prompts are random tokens.

Variants (--variants, each `name` or `name+key=value...`: reference, auto, and options that change
the execution or the kernels) are described in benchmarks/decode_variants.py.
A row that fails (out of memory, say) is reported and the next runs. --check first compares greedy
tokens and logits of `auto` against `reference` (float32: tokens must be equal; bf16: agreement).
--profile_dir traces one decode loop per row and prints its device time per step by kind of kernel
(`step_classes`; `python -m benchmarks.trace_summary` ranks the kernels of a trace); --generate also
times one whole `inference.generate` call per row; --json writes everything with the command, date,
device and versions (benchmarks/RESULTS.md cites it). On the GPU machine: benchmarks/decode_gpu.sh.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import inference
import models
from benchmarks.decode_variants import experts_settings, parse_grid, parse_variant  # noqa: F401 (parse_grid: tests)
from training import metrics as metrics_lib

# HBM bandwidth in bytes/s by device kind (first substring match), from the vendors' datasheets.
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
             "A100": 1.555e12}

# The --tiny preset: a model that compiles and runs in seconds on a CPU, with every kind of layer.
TINY_MODEL = dict(vocab_size=256, hidden_size=64, num_layers=3, first_k_dense=1, num_heads=4,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  dense_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=128)
TINY_RUN = dict(grid=["2x8x4"], warmup=1, repeats=2)


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing this module defines none."""
  config_flags.DEFINE_config_file("config", "configs/bench_v2lite_4l.py", "Run config file (its model).")
  flags.DEFINE_bool("tiny", False, "Shrink the model and the grid to a CPU-sized smoke run (TINY_MODEL).")
  flags.DEFINE_list("grid", ["32x256x64", "64x1024x32"], "BxTxN entries: batch x prompt length x new tokens.")
  flags.DEFINE_list("caches", ["latent", "expanded"], "Cache kinds.")
  flags.DEFINE_list("variants", ["reference", "auto"], "Variants (see the module docstring).")
  flags.DEFINE_string("dtype", "bfloat16", "Weight and compute dtype of the timed model.")
  flags.DEFINE_integer("warmup", 1, "Untimed runs after compilation.")
  flags.DEFINE_integer("repeats", 5, "Timed runs (the median is reported).")
  flags.DEFINE_float("bandwidth", 0.0, "HBM bytes/s for the roofline (0: BANDWIDTH by device kind).")
  flags.DEFINE_bool("check", False, "First compare auto against reference (float32 and bf16 greedy runs).")
  flags.DEFINE_bool("generate", False, "Also time one whole `inference.generate` call per row.")
  flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
  flags.DEFINE_string("profile_dir", "", "If set, trace one decode loop per row (perfetto JSON).")
  flags.DEFINE_string("hlo_dir", "", "If set, write each row's optimized decode-loop HLO there.")


def expected_experts_read(cfg: models.ModelConfig, tokens: int) -> float:
  """Routed experts of one layer that `tokens` tokens pick, in expectation when each picks k distinct
  experts uniformly at random: E · (1 − (1 − k/E)^tokens)."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  return e * (1.0 - (1.0 - k / e) ** tokens) if e else 0.0


def decode_bytes(cfg: models.ModelConfig, state, batch: int, cache_positions: float, kind: str) -> dict:
  """HBM bytes one decode step of `batch` rows must read: {"weights", "cache", "total"}.

  state: the model's nnx state (arrays or abstract shapes). Every parameter counts once, except: the
  embedding table (a lookup: `batch` rows), routed experts (the expected fraction that some token
  picks, `expected_experts_read`) and the MTP module (not used to decode). The cache counts
  `cache_positions` filled positions per row (entries of every layer)."""
  fraction = expected_experts_read(cfg, batch) / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
  weights = 0.0
  for path, var in nnx.to_flat_state(state):
    names = [str(p) for p in path]
    value = var.get_value()  # an array, or an Int8Weight (int8 values and float32 scales)
    nbytes = sum(float(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(value))
    if names[0] == "mtp":
      continue
    if names == ["embed"]:
      nbytes = batch * value.shape[-1] * jnp.dtype(value.dtype).itemsize
    elif names[0] == "moe_layers" and "experts" in names:
      nbytes *= fraction
    weights += nbytes
  cache = inference.cache_bytes(cfg, batch, 1, kind) * cache_positions
  return {"weights": weights, "cache": cache, "total": weights + cache}


def bandwidth_for(device_kind: str, override: float = 0.0) -> float | None:
  return metrics_lib.by_device_kind(BANDWIDTH, device_kind, override)


def build_model(cfg: models.ModelConfig, seed: int = 0) -> models.Transformer:
  """The config's random initialisation (non-zero weights), made on the device in one compiled call."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.state(models.Transformer(cfg, rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)


def _median_seconds(run, warmup: int, repeats: int, setup=None) -> tuple[float, list[float], object]:
  """Median wall time of run(*setup()) blocked until ready, after `warmup` untimed calls."""
  times, out = [], None
  for i in range(warmup + repeats):
    args = setup() if setup else ()
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(*args))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times), times, out


def time_row(model, execution: models.Execution, batch: int, prompt: int, new: int, kind: str, *,
             warmup: int = 1, repeats: int = 5, name: str = "", hlo_dir: str = "", profile_dir: str = "",
             generate: bool = False, compiler_options: dict | None = None) -> dict:
  """Prefill and decode timings of one grid entry and cache kind (see the module docstring);
  compiler_options: XLA options of the prefill and decode compiles."""
  graphdef, state = nnx.split(model)
  cfg = model.cfg
  rng = np.random.default_rng(0)
  ids_BT = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt), dtype=np.int32))
  lengths_B = jnp.full((batch,), prompt, jnp.int32)

  @jax.jit
  def prefill(state, ids_BT, lengths_B):
    m = nnx.merge(graphdef, state)
    cache = inference.init_cache(m.cfg, batch, prompt + new, kind)
    return inference.prefill(m, ids_BT, lengths_B, cache, execution)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def decode(state, cache, token_B):
    m = nnx.merge(graphdef, state)
    # As generate's loop: the per-layer weights once, before the loop (older trees lack decode_layers).
    layers = inference.decode_layers(m, batch, execution) if hasattr(inference, "decode_layers") else None
    kwargs = {} if layers is None else {"layers": layers}

    def body(i, carry):
      cache, token_B, out_BN = carry
      logits_BV, cache = inference.decode_step(m, token_B, cache, execution, **kwargs)
      token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
      return cache, token_B, out_BN.at[:, i].set(token_B)

    return jax.lax.fori_loop(0, new, body, (cache, token_B, jnp.zeros((batch, new), jnp.int32)))

  t0 = time.perf_counter()
  prefill_c = prefill.lower(state, ids_BT, lengths_B).compile(compiler_options)
  compile_prefill_s = time.perf_counter() - t0
  prefill_s, prefill_times, (logits_BV, cache) = _median_seconds(
      lambda: prefill_c(state, ids_BT, lengths_B), warmup, repeats)
  token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  t0 = time.perf_counter()
  decode_c = decode.lower(state, cache, token_B).compile(compiler_options)
  compile_decode_s = time.perf_counter() - t0
  fresh = lambda: (state, jax.tree.map(jnp.copy, cache), token_B)
  decode_s, decode_times, (_, _, tokens_BN) = _median_seconds(decode_c, warmup, repeats, fresh)
  row = {"batch": batch, "prompt": prompt, "new_tokens": new, "cache": kind,
         "prefill_ms": prefill_s * 1e3, "prefill_tokens_per_s": batch * prompt / prefill_s,
         "decode_ms_per_step": decode_s / new * 1e3, "decode_tokens_per_s": batch * new / decode_s,
         "decode_ms_per_step_min_max": [min(decode_times) / new * 1e3, max(decode_times) / new * 1e3],
         "prefill_ms_min_max": [min(prefill_times) * 1e3, max(prefill_times) * 1e3],
         "compile_s": compile_prefill_s + compile_decode_s,
         "first_tokens": np.asarray(tokens_BN[0, :8]).tolist()}
  mem = decode_c.memory_analysis()
  if mem is not None:
    row["decode_memory_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                - mem.alias_size_in_bytes) / 2**30
  name = f"{batch}x{prompt}x{new}_{kind}_{name}"
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"decode_{name}.hlo.txt"), "w") as out:
      out.write(decode_c.as_text())
  if profile_dir:
    args = fresh()
    jax.block_until_ready(args)
    with jax.profiler.trace(os.path.join(profile_dir, name), create_perfetto_trace=True):
      jax.block_until_ready(decode_c(*args))
    traces = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(profile_dir, name)) for f in files
              if f == "perfetto_trace.json.gz"]
    if traces:
      row["step_classes"] = step_classes(traces[0], decode_c.as_text(), new)
  if generate:
    run = lambda: inference.generate(model, ids_BT, new, cache=kind, execution=execution)
    row["generate_s"], _, _ = _median_seconds(run, 1, 2)
  return row


# Where a decode step's device time goes: kernels grouped by the jax op each fusion came from (its HLO
# op_name, read from the compiled HLO); first match wins.
STEP_CLASSES = (
    ("routed experts (inference/experts.py)", ("grouped_ffn", "grouped_down")),
    ("routed experts (training kernels)", ("grouped_product", "ragged")),
    ("lm head", ("btd,dv->btv",)),
    ("attention over the cache", ("mla_decode", "bmr,bur", "bmk,buk", "bmu,bur", "bhus", "bsr", "bsk", "bshk",
                                  "softmax", "reduce_max", "concatenate")),
    ("attention projections", ("btd,dhk", "bthk,hkd", "btd,dx", "btd,dr", "btr,rhk", "buhk,rhk", "buhr,rhk",
                               "bsr,rhk")),
    ("dense MLP, shared experts", ("...d,df", "...f,fd", "pad")),
    ("router, sort by expert", ("btd,de", "top_k", "sort", "scatter", "cumsum", "searchsorted", "gather",
                                "take_along_axis", "repeat", "nd,edf", "nef,efd")),
    ("copies of layer slices (weights, cache)", ("memcpy",)),
)


def step_classes(trace_path: str, hlo_text: str, steps: int) -> list[tuple[str, float, float]]:
  """(class, device µs per step, kernels per step) of a traced decode loop of `steps` steps."""
  import re  # pylint: disable=import-outside-toplevel
  from benchmarks.trace_summary import load_events  # pylint: disable=import-outside-toplevel
  op_names = dict(re.findall(r"%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text))
  events = load_events(trace_path)
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
  time_us, count = {}, {}
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in gpu:
      continue
    name = e["name"]
    text = name + " " + op_names.get(re.sub(r"_(\d+)$", r".\1", name), "")
    label = next((label for label, keys in STEP_CLASSES if any(k in text for k in keys)), "other (elementwise, norms)")
    time_us[label] = time_us.get(label, 0.0) + float(e["dur"])
    count[label] = count.get(label, 0) + 1
  return sorted(((k, v / steps, count[k] / steps) for k, v in time_us.items()), key=lambda r: -r[1])


def check(cfg: models.ModelConfig, grid_entry=(4, 16, 8), variant_specs=()) -> list[dict]:
  """`auto` against `reference`: greedy generate_full in float32 (both caches; tokens must agree) and in
  the config's dtype (latent cache; agreement reported; on a GPU also auto+attn=cudnn, cuDNN prefill);
  then the same model int8-quantized, both variants on the same int8 weights; the model's init at std
  0.02. variant_specs: --variants entries whose options change the kernels (dense=, proj=, route=,
  lhs=, tiles, ...) are checked the same way in float32 on the latent cache, unquantized and int8."""
  batch, prompt, new = grid_entry
  results = []
  gpu = jax.devices()[0].platform == "gpu"
  for dtype, kinds, quantize in (("float32", ("latent", "expanded"), None), (cfg.dtype.name, ("latent",), None),
                                 ("float32", ("latent",), "int8"), (cfg.dtype.name, ("latent",), "int8")):
    c = cfg.replace(dtype=dtype, param_dtype=dtype, init_std=0.02)
    model = build_model(c, seed=1)
    if quantize:
      model = inference.quantize(model, quantize)
    ids = np.random.default_rng(1).integers(0, c.vocab_size, (batch, prompt), dtype=np.int32)
    variants = {"auto": (models.Execution(), {})}
    if gpu and dtype != "float32":  # cuDNN attention needs bf16/fp16
      variants["auto+attn=cudnn"] = (models.Execution(attention_impl="cudnn"), {})
    if dtype == "float32":
      for spec in variant_specs:
        fields, settings = parse_variant(spec)
        settings = {key: value for key, value in settings.items() if key not in ("quantize", "xla")}
        if settings and "grouped_matmul" not in fields:
          variants[spec.replace("+q=int8", "")] = (models.Execution(**fields), settings)
    for kind in kinds:
      run = lambda e: inference.generate_full(model, ids, new, cache=kind, output_logits=True, execution=e)  # pylint: disable=cell-var-from-loop
      ref = run(models.Execution(grouped_matmul="xla"))
      ref_logits = np.asarray(ref.logits)
      top2 = np.sort(ref_logits, axis=-1)[..., -2:]
      for variant, (execution, settings) in variants.items():
        if settings and kind != "latent":
          continue
        with experts_settings(settings):
          out = run(execution)
        out_logits = np.asarray(out.logits)
        same = np.asarray(ref.tokens) == np.asarray(out.tokens)
        results.append({"dtype": dtype, "cache": kind, "variant": variant + (f"+q={quantize}" if quantize else ""),
                        "tokens_equal": bool(same.all()),
                        "token_agreement": float(same[:, prompt:].mean()),
                        "first_step_max_abs_logit_diff": float(np.abs(out_logits[:, 0] - ref_logits[:, 0]).max()),
                        "max_abs_logit": float(np.abs(ref_logits).max()),
                        "min_top2_margin": float((top2[..., 1] - top2[..., 0]).min())})
        print(json.dumps({"check": results[-1]}), flush=True)
  return results


def main(argv):
  del argv
  f = flags.FLAGS
  model_fields = f.config.model.to_dict()
  grid, warmup, repeats = f.grid, f.warmup, f.repeats
  if f.tiny:
    model_fields.update(TINY_MODEL)
    grid, warmup, repeats = TINY_RUN["grid"], TINY_RUN["warmup"], TINY_RUN["repeats"]
  model_fields.update(dtype=f.dtype, param_dtype=f.dtype)
  cfg = models.from_dict(model_fields)
  device = jax.devices()[0]
  platform = device.platform
  bandwidth = bandwidth_for(device.device_kind, f.bandwidth)
  print(f"{device.device_kind} | jax {jax.__version__} | {cfg.num_layers} layers, {cfg.dtype.name} weights | "
        f"HBM {bandwidth / 1e12 if bandwidth else float('nan'):.2f} TB/s | median of {repeats} after {warmup} warm-up",
        flush=True)
  checks = []
  if f.check:
    try:
      checks = check(cfg, variant_specs=f.variants)
    except Exception as e:  # noqa: BLE001 - report it and time the rows anyway
      checks = [{"error": f"{type(e).__name__}: {str(e)[:2000]}"}]
      print(json.dumps({"check": checks[0]}), flush=True)
  base_model = build_model(cfg)
  results = []
  for spec in f.variants:
    fields, settings = parse_variant(spec)
    execution = models.Execution(**fields).for_inference().resolve(platform)
    name = spec.replace("+", "_").replace("=", "-")
    model = inference.quantize(base_model, settings["quantize"]) if "quantize" in settings else base_model
    state = nnx.state(model)
    with experts_settings(settings):
      for entry in grid:
        batch, prompt, new = parse_grid(entry)
        for kind in f.caches:
          try:
            row = time_row(model, execution, batch, prompt, new, kind, warmup=warmup, repeats=repeats,
                           name=name, hlo_dir=f.hlo_dir, profile_dir=f.profile_dir, generate=f.generate,
                           compiler_options=settings.get("xla"))
          except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it and time the next row
            row = {"batch": batch, "prompt": prompt, "new_tokens": new, "cache": kind,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
          bytes_ = decode_bytes(cfg, state, batch, prompt + (new - 1) / 2, kind)
          row.update(variant=spec, grouped_matmul=execution.grouped_matmul,
                     attention_impl=execution.attention_impl, step_bytes=bytes_)
          if bandwidth:
            row["roofline_ms"] = bytes_["total"] / bandwidth * 1e3
            if "decode_ms_per_step" in row:
              row["roofline_ratio"] = row["decode_ms_per_step"] / row["roofline_ms"]
          results.append(row)
          print(json.dumps(row), flush=True)
          jax.clear_caches()
  print("\n| B x T x N | cache | variant | prefill ms | prefill tok/s | decode ms/step | decode tok/s | "
        "roofline ms | ratio | GB/step |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    head = f"| {r['batch']}x{r['prompt']}x{r['new_tokens']} | {r['cache']} | {r['variant']} |"
    if "error" in r:
      print(f"{head} {r['error'][:120]} |")
      continue
    roof = f"{r['roofline_ms']:.3f} | {r['roofline_ratio']:.2f}" if "roofline_ms" in r else "n/a | n/a"
    print(f"{head} {r['prefill_ms']:.1f} | {r['prefill_tokens_per_s']:,.0f} | {r['decode_ms_per_step']:.3f} | "
          f"{r['decode_tokens_per_s']:,.0f} | {roof} | {r['step_bytes']['total'] / 1e9:.3f} |")
  for r in results:
    if "step_classes" in r:
      print(f"\n{r['batch']}x{r['prompt']}x{r['new_tokens']} {r['cache']} {r['variant']}: device time per decode step")
      print("| kernels of | µs/step | kernels/step |\n|---|---|---|")
      for label, us, n in r["step_classes"]:
        print(f"| {label} | {us:.0f} | {n:.0f} |")
  if f.json:
    versions = {}
    for name in ("jax", "jaxlib", "flax"):
      try:
        versions[name] = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        versions[name] = None
    args = [a.split("=")[0] if a.startswith(("--profile_dir", "--hlo_dir")) else a for a in sys.argv[1:]
            if not a.startswith("--json")]
    record = {"command": "python -m benchmarks.decode " + " ".join(args),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device.device_kind, "versions": versions, "bandwidth": bandwidth,
              "model": cfg.to_dict(), "warmup": warmup, "repeats": repeats, "checks": checks, "results": results}
    with open(f.json, "w") as out:
      json.dump(record, out, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
