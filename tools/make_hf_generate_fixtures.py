"""Golden greedy generations from transformers for the tiny HF fixture checkpoints.

For each checkpoint directory tests/fixtures/hf/{v3_tiny, v2_lite_tiny, v2_tiny} (written by
tools/make_hf_fixtures.py) this loads the model with transformers in float32 (eager attention and
experts), runs `generate` greedily with the KV cache (do_sample=False, max_new_tokens=12, no EOS
stopping) on 2 prompts of length 10 and writes tests/fixtures/hf/<name>.generate.safetensors:

  prompt_ids     int32 [2, 10]
  generated_ids  int32 [2, 22]       prompt followed by the 12 greedy tokens
  step_logits    f32   [2, 12, V]    transformers' raw logits at each generation step
  margins        f32   [2, 12]       top1 - top2 of those logits (asserted > MIN_TOKEN_MARGIN)
  penalty_scores f32   [2, V]        RepetitionPenaltyLogitsProcessor(PENALTY)(generated_ids, last logits)
  top_k_scores   f32   [2, V]        TopKLogitsWarper(TOP_K) of the last logits (-inf where removed)
  top_p_scores   f32   [2, V]        TopPLogitsWarper(TOP_P) of the last logits (-inf where removed)
  settings       f32   [3]           (PENALTY, TOP_K, TOP_P) used for the three above

Prompts are drawn from a seeded generator; seeds are scanned (deterministically) until every greedy
step has a top1-top2 logit margin > MIN_TOKEN_MARGIN and every routing decision taken while
generating (prefill and each cached decode step, seen by hooks on the routers) has a gap >
MIN_ROUTING_MARGIN, so float32 differences in a reimplementation cannot flip a token.

Run from the repo root (after tools/make_hf_fixtures.py) with a Python 3.11 virtualenv with torch 2.13
(CPU), transformers, safetensors and numpy:
    python -m tools.make_hf_generate_fixtures --out tests/fixtures/hf
The script is deterministic: rerunning it reproduces byte-identical files.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from transformers import (AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                          TopPLogitsWarper)
from transformers import logging as hf_logging

from tools.make_hf_fixtures import IMPL, router_margin

NAMES = ("v3_tiny", "v2_lite_tiny", "v2_tiny")
BATCH, PROMPT, NEW = 2, 10, 12
MIN_TOKEN_MARGIN = 1e-3  # brief: float32 noise (~1e-5 here) must not be able to flip a greedy token
MIN_ROUTING_MARGIN = 1e-4  # as tools/make_hf_fixtures.py requires of the reference inputs
PENALTY, TOP_K, TOP_P = 1.3, 5, 0.8


def load(d):
  model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **IMPL).eval()
  model.generation_config.eos_token_id = None  # never stop early: always exactly NEW tokens
  model.generation_config.pad_token_id = 0
  return model


@torch.no_grad()
def greedy(model, prompt_BT):
  """transformers' cached greedy generation, with the min routing gap seen during it."""
  margin = [float("inf")]

  def hook(mod, args, _out):
    margin[0] = min(margin[0], router_margin(mod, args[0])[0])

  routers = [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
  handles = [m.register_forward_hook(hook) for m in routers]
  try:
    out = model.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT), do_sample=False,
                         max_new_tokens=NEW, min_new_tokens=NEW, use_cache=True, output_logits=True,
                         return_dict_in_generate=True)
  finally:
    for h in handles:
      h.remove()
  logits_BNV = torch.stack(out.logits, dim=1).float()
  assert out.sequences.shape == (BATCH, PROMPT + NEW), out.sequences.shape
  assert torch.equal(out.sequences[:, PROMPT:], logits_BNV.argmax(-1)), "generate is not greedy"
  top2 = logits_BNV.topk(2, dim=-1).values
  return out.sequences, logits_BNV, top2[..., 0] - top2[..., 1], margin[0]


def make(out_dir, name):
  model = load(out_dir / name)
  vocab = model.config.vocab_size
  for seed in range(100):
    prompt = torch.randint(0, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))
    seqs, logits, margins, routing = greedy(model, prompt)
    if float(margins.min()) > MIN_TOKEN_MARGIN and routing > MIN_ROUTING_MARGIN:
      break
  else:
    raise RuntimeError(f"{name}: no prompt seed gives decisive greedy steps")
  # A full recompute without the cache must agree with the cached logits (sanity of the reference).
  with torch.no_grad():
    full = model(seqs[:, :-1], use_cache=False).logits[:, PROMPT - 1:]
  assert (full - logits).abs().max() < 1e-4, "transformers' cached and uncached logits disagree"

  last = logits[:, -1].clone()
  outputs = {
      "prompt_ids": prompt.numpy().astype(np.int32),
      "generated_ids": seqs.numpy().astype(np.int32),
      "step_logits": logits.numpy(),
      "margins": margins.numpy(),
      "penalty_scores": RepetitionPenaltyLogitsProcessor(PENALTY)(seqs, last.clone()).numpy(),
      "top_k_scores": TopKLogitsWarper(TOP_K)(seqs, last.clone()).numpy(),
      "top_p_scores": TopPLogitsWarper(TOP_P)(seqs, last.clone()).numpy(),
      "settings": np.array([PENALTY, TOP_K, TOP_P], np.float32),
  }
  # safetensors writes the raw buffer: views (the processors return a [..., :V] slice) must be copied.
  outputs = {k: np.ascontiguousarray(v) for k, v in outputs.items()}
  path = out_dir / f"{name}.generate.safetensors"
  save_numpy(outputs, str(path))  # no metadata: its header order is not deterministic
  path.chmod(0o644)
  print(f"{name}: prompt seed {seed}, min token margin {float(margins.min()):.3g}, "
        f"min routing margin {routing:.3g}, generated {seqs[:, PROMPT:].tolist()}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("tests/fixtures/hf"))
  args = parser.parse_args()
  hf_logging.set_verbosity_error()  # the v3 checkpoint's extra MTP layer is reported as unexpected
  hf_logging.disable_progress_bar()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  for name in NAMES:
    make(args.out, name)


if __name__ == "__main__":
  main()
