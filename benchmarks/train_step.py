"""Times the real jitted train step (forward, backward, AdamW, router-bias update) on one device or a mesh.

  python -m benchmarks.train_step                                   # configs/bench_v2lite_4l.py, 8 x 2048
  python -m benchmarks.train_step --variants=capacity:1.0+attn=cudnn,dropless --docs_per_row=4 --steps=10
  python -m benchmarks.train_step --meshes=expert=1,expert=2,expert=4,expert=8 --variants=dropless  # weak scaling

Each variant is a MoE backend (`dropless`, or `capacity:<factor>`) with options:
models.Execution fields `+remat=<policy>`, `+attn=<xla|cudnn>`, `+gmm=<auto|xla|tokamax>` (grouped_matmul
"auto" is resolved for the device, as `sharding.make_execution` does), `+logits=compute`,
`+unroll=true`, `+cast=true`; the optimizer's `+moments=<float32|bfloat16>` (`optim.moment_dtype`; the
bench config stores bf16 moments); and `+lse=onepass` (the loss reads the logits once for their
logsumexp, `training.loss.ONE_PASS_LOGSUMEXP`). E.g. `capacity:1.0+attn=cudnn` or `dropless+attn=cudnn`.
For each: compile, warm up, then time `--steps` steps one by one (blocking on the loss after each) and report the
median step time, tokens/s, model TFLOP/s per device (6·activated params + 3·causal attention per
token, models/counting.py), MFU against the device's dense bf16 peak, and the step's memory (XLA's
memory analysis). Tokens are random (never zeros). The first step's loss is printed per variant as a
cross-check: every variant starts from the same initialisation and batch. A variant that fails (out
of memory, say) is reported and the next one runs. `--profile_dir` traces one extra step per variant;
`python -m benchmarks.trace_summary` ranks its kernels. `--json=PATH` writes the results with the
command, date, device and versions; every row of benchmarks/RESULTS.md cites such a file, committed in
benchmarks/results/.

`--meshes` times every variant on each listed mesh instead of one device: an entry names mesh axes
(`expert=4`, `expert=4+fsdp=2`; sharding/mesh.py's axes, the rest 1) and runs on the first
product-of-sizes devices, with the state sharded and the step jitted as train.py does
(training/run_state.py, `sharding.make_execution`: expert-parallel dispatch when `expert` > 1). The batch
is `--batch` sequences per device (weak scaling), or `--batch` in all when --noweak_scaling. Rows add
tokens/s per device, the memory per device that tools.plan predicts (training/memory.py)
beside the compiled step's, and, with --profile_dir, the device time per step in all_to_all and in the other
collectives (`collective_ms`; each device's share, from the GPU kernels' names).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import importlib.metadata
import json
import re
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import models
import sharding
from models import counting
from training import loss as loss_lib
from training import optimizer as optim_lib
from training import memory as memory_lib
from training import run_state
from training import step as step_lib
from training.metrics import peak_flops
from training.state import ModelDef, init_state


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing this module defines none."""
  config_flags.DEFINE_config_file("config", "configs/bench_v2lite_4l.py", "Run config file.")
  flags.DEFINE_list(
      "variants", ["capacity:1.0+attn=cudnn", "capacity:1.0+attn=cudnn+remat=full", "capacity:1.0+remat=full"],
      "Variants to time (see the module docstring).")
  flags.DEFINE_integer("batch", 8, "Sequences per step.")
  flags.DEFINE_integer("seq", 2048, "Tokens per sequence.")
  flags.DEFINE_integer("docs_per_row", 1,
                       "Documents packed in each row (equal lengths; > 1 exercises the segment mask).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
  flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
  flags.DEFINE_string("profile_dir", "", "If set, trace one more step per variant (perfetto JSON).")
  flags.DEFINE_list("meshes", [], "Mesh entries (axis=size+axis=size...) to time each variant on; empty: one device.")
  flags.DEFINE_bool("weak_scaling", True, "With --meshes: --batch sequences per device (else in all).")


def parse_variant(spec: str) -> dict:
  """'capacity:1.0+remat=full+attn=cudnn' → execution fields (moe_backend, capacity_factor, remat_policy,
  attention_impl, grouped_matmul)."""
  backend, *options = spec.split("+")
  fields = {}
  if backend == "dropless":
    fields["moe_backend"] = "dropless"
  elif backend.startswith("capacity:"):
    fields.update(moe_backend="capacity", capacity_factor=float(backend.split(":", 1)[1]))
  else:
    raise ValueError(f"unknown variant {spec!r}: expected dropless or capacity:<factor>, then +key=value options")
  names = {"remat": "remat_policy", "attn": "attention_impl", "gmm": "grouped_matmul", "moments": "moment_dtype",
           "logits": "logits_dtype", "unroll": "unroll_layers", "lse": "logsumexp",
           "cast": "cast_weights_once"}
  for option in options:
    key, _, value = option.partition("=")
    if key not in names or not value:
      raise ValueError(f"unknown option {option!r} in variant {spec!r} (known: remat=<policy>, attn=<impl>, "
                       "gmm=<impl>, moments=<float32|bfloat16>, logits=<float32|compute>, unroll=<true|false>, "
                       "lse=<onepass|twopass>, cast=<true|false>)")
    allowed = {"unroll": {"true": True, "false": False}, "cast": {"true": True, "false": False},
               "lse": {"onepass": "onepass", "twopass": "twopass"}}.get(key)
    if allowed is not None and value not in allowed:
      raise ValueError(f"option {option!r} in variant {spec!r}: expected {key}=<{'|'.join(allowed)}>")
    fields[names[key]] = value if allowed is None else allowed[value]
  return fields


def spec_name(fields: dict) -> str:
  return "-".join(f"{v}" for v in fields.values()).replace(".", "_")


def parse_mesh(entry: str) -> dict[str, int]:
  """'expert=4+fsdp=2' → {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1} (axes not named are 1)."""
  sizes = {axis: 1 for axis in sharding.AXES}
  for part in entry.split("+"):
    axis, _, value = part.partition("=")
    if axis not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"bad mesh entry {entry!r}: expected axis=size parts joined by '+', axes {sharding.AXES}")
    sizes[axis] = int(value)
  return sizes


# Collective kernels as NCCL and XLA name them on GPUs; all_to_all first (NCCL runs it as send/recv).
COLLECTIVES = (("all_to_all", r"all.?to.?all|alltoall|sendrecv"),
               ("other collectives", r"all.?reduce|reduce.?scatter|all.?gather|collective.?permute|nccl"))


def collective_ms(events: list[dict], num_devices: int, device: str = "GPU") -> dict[str, float]:
  """Device milliseconds per collective class (COLLECTIVES) in a trace of one step, per device (the
  trace holds every local device's kernels)."""
  from benchmarks.trace_summary import device_time_by_name  # pylint: disable=import-outside-toplevel
  per_name, _, _ = device_time_by_name(events, device)
  out = {label: 0.0 for label, _ in COLLECTIVES}
  for name, us in per_name.items():
    label = next((label for label, pattern in COLLECTIVES if re.search(pattern, name, re.IGNORECASE)), None)
    if label:
      out[label] += us / 1e3 / num_devices
  return out


def random_batch(vocab_size: int, batch: int, seq: int, docs_per_row: int = 1, seed: int = 0) -> dict:
  """A packed batch of random tokens: each row holds `docs_per_row` documents of (nearly) equal length."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int32)
  segments = 1 + np.arange(seq) * docs_per_row // seq
  starts = np.searchsorted(segments, segments)  # index where each token's document begins
  positions = np.arange(seq) - starts
  return {"tokens": jnp.asarray(tokens),
          "positions": jnp.asarray(np.broadcast_to(positions, (batch, seq)), jnp.int32),
          "segment_ids": jnp.asarray(np.broadcast_to(segments, (batch, seq)), jnp.int32)}


NON_EXECUTION_FIELDS = ("moment_dtype", "logsumexp")


def time_variant(config, fields: dict, batch: dict, warmup: int, steps: int, profile_dir: str = "",
                 mesh: jax.sharding.Mesh | None = None) -> dict:
  """One variant's row; `logsumexp` (onepass|twopass) sets `training.loss.ONE_PASS_LOGSUMEXP` for it."""
  with mock.patch.object(loss_lib, "ONE_PASS_LOGSUMEXP", fields.get("logsumexp") == "onepass"):
    return _time_variant(config, fields, batch, warmup, steps, profile_dir, mesh)


def _time_variant(config, fields, batch, warmup, steps, profile_dir, mesh) -> dict:
  config = config.copy_and_resolve_references()
  if "moment_dtype" in fields:  # an optimizer setting
    config.optim.moment_dtype = fields["moment_dtype"]
  config.execution.update({k: v for k, v in fields.items() if k not in NON_EXECUTION_FIELDS})
  model_cfg = models.from_dict(config.model.to_dict())
  platform = jax.devices()[0].platform
  tx = optim_lib.make_optimizer(config.optim, config.total_steps)
  schedule = optim_lib.learning_rate_schedule(config.optim, config.total_steps)
  if mesh is None:
    execution = models.execution_from_dict(config.execution).resolve(platform)
    execution.check(model_cfg, platform=platform)
    modeldef = ModelDef.abstract(model_cfg)
    state = jax.jit(lambda: init_state(model_cfg, tx, config.seed)[1])()
    step = jax.jit(step_lib.make_train_step(modeldef, tx, schedule, config, execution), donate_argnums=(0,))
  else:  # as train.py: sharded state, expert-parallel dispatch over the mesh's expert axis
    rules = config.get("sharding_rules")
    sharding.validate(model_cfg, mesh, batch_size=batch["tokens"].shape[0], rules=rules)
    execution = sharding.make_execution(config.execution, mesh, rules)
    execution.check(model_cfg, platform=platform)
    rs = run_state.plan(config, model_cfg, tx, mesh)
    state = run_state.initial_state(rs, config, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = jax.device_put(batch, batch_sharding)
    with jax.set_mesh(mesh):
      step = jax.jit(step_lib.make_train_step(rs.modeldef, tx, schedule, config, execution),
                     in_shardings=(rs.shardings, batch_sharding),
                     out_shardings=(rs.shardings, None), donate_argnums=(0,))

  num_devices = 1 if mesh is None else mesh.size
  name = spec_name(fields) + ("" if mesh is None else f"_{num_devices}dev")
  trace_events = None
  t0 = time.perf_counter()
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    losses, times = [], []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      losses.append(float(metrics["train/loss"]))  # blocks until the step is done
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    if profile_dir:
      with jax.profiler.trace(f"{profile_dir}/{name}", create_perfetto_trace=True):
        state, metrics = compiled(state, batch)
        float(metrics["train/loss"])
      traces = glob.glob(f"{profile_dir}/{name}/**/perfetto_trace.json.gz", recursive=True)
      if traces and platform == "gpu":
        from benchmarks.trace_summary import load_events  # pylint: disable=import-outside-toplevel
        trace_events = load_events(sorted(traces)[-1])
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite loss in {fields}: {losses}")

  seconds = statistics.median(times)
  tokens = batch["tokens"].size
  flops_per_token = counting.train_flops_per_token(model_cfg, batch["tokens"].shape[1])
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  tflops = flops_per_token * tokens / seconds / 1e12 / num_devices
  mem = compiled.memory_analysis()  # the step's own footprint per device: state, batch, temporaries (donation aliases)
  memory = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else 0
  row = {"variant": fields, "grouped_matmul": execution.grouped_matmul, "first_loss": losses[0], "compile_s": compile_s, "step_ms_median": seconds * 1e3,
         "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3, "tokens_per_s": tokens / seconds,
         "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak if peak else None,
         "step_memory_gib": memory / 2**30}
  if mesh is not None:
    row.update(devices=num_devices, mesh=dict(mesh.shape), global_batch=batch["tokens"].shape[0],
               tokens_per_s_per_device=tokens / seconds / num_devices, losses=losses,
               expert_parallel=execution.expert_parallel is not None)
    planned = config.copy_and_resolve_references()  # tools.plan's estimate for this batch, one microbatch
    planned.update(batch_size=batch["tokens"].shape[0], seq_len=batch["tokens"].shape[1], grad_accum_steps=1)
    row["planned_memory_gib"] = memory_lib.plan_memory(planned, model_cfg, dict(mesh.shape)).total / 2**30
    if trace_events is not None:
      row["collective_ms"] = collective_ms(trace_events, num_devices)
  return row


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  device = jax.devices()[0]
  meshes = [parse_mesh(entry) for entry in f.meshes] or [None]
  print(f"{device.device_kind} x {jax.device_count()} | jax {jax.__version__} | batch {f.batch} x {f.seq}"
        f"{' per device' if f.meshes and f.weak_scaling else ''}, {f.docs_per_row} document(s) per row | "
        f"median of {f.steps} steps after {f.warmup} warm-up")
  results = []
  for sizes in meshes:
    for spec in f.variants:
      axes = "+".join(f"{a}={n}" for a, n in (sizes or {}).items() if n > 1) or "1 device"
      label = spec if sizes is None else f"{spec} @ {axes}"
      try:
        mesh = None
        if sizes is not None:
          count = int(np.prod(list(sizes.values())))
          if count > jax.device_count():
            raise ValueError(f"mesh {sizes} needs {count} devices, {jax.device_count()} present")
          mesh = sharding.make_mesh(sizes, jax.devices()[:count])
        rows = f.batch * (mesh.size if mesh is not None and f.weak_scaling else 1)
        batch = random_batch(config.model.vocab_size, rows, f.seq, f.docs_per_row)
        result = time_variant(config, parse_variant(spec), batch, f.warmup, f.steps, f.profile_dir, mesh)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it and time the next variant
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
      result["spec"] = label
      results.append(result)
      print(json.dumps(result), flush=True)
      jax.clear_caches()
  print(f"\n| variant | step ms (min-max) | tokens/s | TFLOP/s | MFU | step GiB | first loss | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    if "error" in r:
      print(f"| {r['spec']} | {r['error']} |")
      continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"| {r['spec']} | {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | "
          f"{r['tokens_per_s']:,.0f} | {r['tflops_per_device']:.0f} | {mfu} | {r['step_memory_gib']:.1f} | "
          f"{r['first_loss']:.4f} | {r['compile_s']:.0f} |")
  if f.meshes:
    print("\n| variant @ mesh | devices | global batch | tokens/s per device | step GiB (plan) | all_to_all ms | "
          "other collectives ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
      if "error" not in r:
        coll = r.get("collective_ms")
        coll = f"{coll['all_to_all']:.2f} | {coll['other collectives']:.2f}" if coll else "n/a | n/a"
        print(f"| {r['spec']} | {r['devices']} | {r['global_batch']} | {r['tokens_per_s_per_device']:,.0f} | "
              f"{r['step_memory_gib']:.2f} ({r['planned_memory_gib']:.2f}) | {coll} |")
  if f.json:
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}
    # Output paths are where this machine wrote files, not part of what was measured (a traced step
    # runs after the timed ones): "--profile_dir=DIR" is recorded as "--profile_dir".
    args = [a.split("=")[0] if a.startswith("--profile_dir") else a for a in sys.argv[1:]
            if not a.startswith("--json")]
    record = {"command": "python -m benchmarks.train_step " + " ".join(args),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device.device_kind, "device_count": jax.device_count(), "versions": versions,
              "batch": f.batch, "seq": f.seq, "docs_per_row": f.docs_per_row, "warmup": f.warmup, "steps": f.steps,
              "results": results}
    with open(f.json, "w") as out:
      json.dump(record, out, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
