"""What weight quantization changes in a model: eval.py --quantize=int8.

  report = quantization.compare(config, model, inference.quantize(model, "int8"), base, quantized)

The eval metrics of both models (from `runner.evaluate`) side by side, and greedy agreement:
`generate` continues the same validation prompts with both models for `new_tokens` steps, and the
report gives the fraction of prompts whose tokens are all identical, and the mean length of the
identical prefix. For a model that computes in less than float32, the same agreement between it and
itself computing in float32 comes with it: the part of the disagreement that rounding to the compute
dtype causes anyway (greedy continuations diverge after near ties).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import inference
import models
from data import pipeline
from training import state as state_lib


def validation_prompts(config, num_prompts: int, prompt_len: int) -> np.ndarray:
  """The first `prompt_len` tokens of the first `num_prompts` validation rows, int32 [N, prompt_len]."""
  rows, it = [], pipeline.make_iterator(config.data, split="validation", seq_len=config.seq_len,
                                        global_batch_size=config.batch_size, seed=config.seed, num_epochs=1)
  for batch in it:
    rows.extend(batch["tokens"][:, :prompt_len])
    if len(rows) >= num_prompts:
      break
  if len(rows) < num_prompts:
    raise ValueError(f"the validation split has {len(rows)} rows, fewer than the {num_prompts} prompts asked for")
  return np.stack(rows[:num_prompts]).astype(np.int32)


def greedy_agreement(model: models.Transformer, other: models.Transformer, prompts_NT, new_tokens: int,
                     batch_size: int = 32) -> dict:
  """Greedy continuations of both models: identical_fraction (every token equal), mean_prefix (tokens
  equal before the first difference, averaged over prompts), token_agreement (equal positions)."""
  t = prompts_NT.shape[1]
  same = []
  for start in range(0, len(prompts_NT), batch_size):
    ids = prompts_NT[start:start + batch_size]
    a = np.asarray(inference.generate(model, ids, new_tokens))[:, t:]
    b = np.asarray(inference.generate(other, ids, new_tokens))[:, t:]
    same.append(a == b)
  same = np.concatenate(same)
  prefix = np.where(same.all(axis=1), new_tokens, np.argmin(same, axis=1))
  return {"prompts": int(same.shape[0]), "new_tokens": int(new_tokens),
          "identical_fraction": float(same.all(axis=1).mean()), "mean_prefix": float(prefix.mean()),
          "token_agreement": float(same.mean())}


def compare(config, model: models.Transformer, quantized: models.Transformer, base: dict, result: dict, *,
            method: str, num_prompts: int = 64, prompt_len: int = 64, new_tokens: int = 32) -> dict:
  """The quantization report: both models' eval scalars, their relative change, greedy agreement."""
  prompt_len = min(prompt_len, config.seq_len)
  changes = {}
  for key, value in base["eval"].items():
    if key.startswith("eval/") and key != "eval/tokens":
      changes[key] = {"base": value, method: result["eval"][key],
                      "relative_change": (result["eval"][key] - value) / abs(value) if value else 0.0}
  prompts = validation_prompts(config, num_prompts, prompt_len)
  report = {"method": method, "dtype": str(jnp.dtype(model.cfg.dtype)), "eval": changes,
            "greedy": dict(greedy_agreement(model, quantized, prompts, new_tokens), prompt_len=prompt_len)}
  if jnp.dtype(model.cfg.dtype) != jnp.float32:
    modeldef, params, bias = state_lib.split_model(model)
    float32 = state_lib.ModelDef.abstract(dataclasses.replace(modeldef.cfg, dtype=jnp.float32)).merge(params, bias)
    report["greedy_float32_vs_dtype"] = greedy_agreement(float32, model, prompts, new_tokens)
  return report


def summary(report: dict) -> str:
  method = report["method"]
  lines = [f"quantization {method} (compute {report['dtype']}) against the unquantized weights:"]
  for key, change in report["eval"].items():
    lines.append(f"  {key}: {change['base']:.4f} -> {change[method]:.4f} ({100 * change['relative_change']:+.2f} %)")
  g = report["greedy"]
  lines.append(f"  greedy, {g['prompts']} validation prompts of {g['prompt_len']} tokens, {g['new_tokens']} new "
               f"tokens: {_agreement(g)}")
  if "greedy_float32_vs_dtype" in report:
    lines.append(f"  for scale, the unquantized model computing in float32 vs {report['dtype']}: "
                 f"{_agreement(report['greedy_float32_vs_dtype'])}")
  return "\n".join(lines)


def _agreement(g: dict) -> str:
  return (f"identical {100 * g['identical_fraction']:.1f} % of prompts, mean identical prefix "
          f"{g['mean_prefix']:.1f} tokens, {100 * g['token_agreement']:.1f} % of tokens equal")
