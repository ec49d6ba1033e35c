"""Metrics: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard events, a progress line."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from absl import logging

# Peak dense bf16 FLOP/s per chip, for MFU. Keys are matched against jax's device_kind.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def by_device_kind(table: dict[str, float], device_kind: str, override: float = 0.0) -> float | None:
  """`override` if set, else the value of the first key of `table` found in `device_kind`, else None."""
  if override:
    return override
  return next((value for key, value in table.items() if key.lower() in device_kind.lower()), None)


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
  return by_device_kind(PEAK_FLOPS, device_kind, override)


def expert_load_stats(counts) -> list[dict]:
  """Per MoE layer of routed-token counts [L, E] (or one layer's [E]): the fraction of routed tokens
  each expert got (sums to 1), the max/min load relative to a perfectly balanced one (1.0 = balanced;
  E·fraction), and the routing entropy normalised by log E (1.0 = uniform)."""
  rows = np.asarray(counts, np.float64).reshape(-1, np.shape(counts)[-1])
  layers = []
  for i, row in enumerate(rows):
    e = row.shape[-1]
    frac = row / max(row.sum(), 1.0)
    p = frac[frac > 0]
    layers.append({
        "layer": i,
        "tokens": float(row.sum()),
        "fractions": frac.tolist(),
        "load_max": float(frac.max() * e),
        "load_min": float(frac.min() * e),
        "routing_entropy": float(-(p * np.log(p)).sum() / math.log(e)) if e > 1 else 1.0,
    })
  return layers


def load_scalars(prefix: str, counts) -> dict[str, float]:
  """`<prefix>/layer<i>/{load_max,load_min,routing_entropy}` for stacked [L, E] counts, or
  `<prefix>/{...}` for a single layer's [E] (the MTP block)."""
  stacked = np.ndim(counts) > 1
  out = {}
  for layer in expert_load_stats(counts):
    name = f"{prefix}/layer{layer['layer']}" if stacked else prefix
    for key in ("load_max", "load_min", "routing_entropy"):
      out[f"{name}/{key}"] = layer[key]
  return out


def _scalars(metrics: dict) -> dict:
  """Scalars pass through; `<prefix>/expert_load` counts become per-layer load scalars under <prefix>."""
  out = {}
  for key, value in metrics.items():
    if key.endswith("/expert_load"):
      out.update(load_scalars(key.removesuffix("/expert_load"), value))
    else:
      out[key] = float(np.asarray(value))
  return out


class MetricsWriter:
  """Only process 0 writes; other processes' calls are no-ops."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard events are optional; the JSONL file is the record
      logging.warning("tensorboardX is not installed; writing metrics.jsonl only")

  def write(self, step: int, metrics: dict) -> dict:
    scalars = _scalars(metrics)
    if self.enabled:
      self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self._jsonl.flush()
      if self._tb is not None:
        for key, value in scalars.items():
          self._tb.add_scalar(key, value, int(step))
        self._tb.flush()
    return scalars

  def write_hparams(self, config) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text("config", "```\n" + str(config) + "\n```", 0)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Throughput and ETA between logged steps, and the console line."""

  def __init__(self, total_steps: int, first_step: int, flops_per_token: float, peak: float | None,
               num_devices: int):
    self.total, self.flops_per_token, self.peak, self.num_devices = total_steps, flops_per_token, peak, num_devices
    self._t, self._step, self._tokens = time.perf_counter(), first_step, 0.0

  def add_tokens(self, n: float):
    self._tokens += n

  def perf(self, step: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    tps = self._tokens / dt
    out = {"perf/tokens_per_sec": tps, "perf/step_time_s": dt / max(step - self._step, 1)}
    if self.peak:
      out["perf/mfu"] = tps * self.flops_per_token / (self.peak * self.num_devices)
    self._t, self._step, self._tokens = now, step, 0.0
    return out

  def line(self, step: int, scalars: dict) -> str:
    eta = scalars.get("perf/step_time_s", 0.0) * (self.total - step)
    if "grpo/reward_mean" in scalars:  # an RL step: what the rollouts earned, and where the time went
      acc = f"  accuracy {scalars['grpo/accuracy']:.3f}" if "grpo/accuracy" in scalars else ""
      return (f"step {step}/{self.total}  reward {scalars['grpo/reward_mean']:.3f}{acc}  "
              f"kl {scalars.get('grpo/kl', 0.0):.4f}  rollout {scalars.get('perf/rollout_s', 0.0):.2f} s  "
              f"update {scalars.get('perf/update_s', 0.0):.2f} s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    mfu = f"{100 * scalars['perf/mfu']:.1f}%" if "perf/mfu" in scalars else "n/a"
    return (f"step {step}/{self.total}  loss {scalars.get('train/loss', float('nan')):.4f}  "
            f"tokens/s {scalars.get('perf/tokens_per_sec', 0):,.0f}  MFU {mfu}  "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
