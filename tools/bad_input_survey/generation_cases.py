"""Generation: inference.generate / generate_full and evaluation/sample.py on one tiny random model."""

from __future__ import annotations

import contextlib
import functools
import io
from unittest import mock

import jax.numpy as jnp
import numpy as np
from flax import nnx

import inference
import models
from data import tokenizers
from evaluation import sample
from inference import decode
from models.router import RouterBias

from tools.bad_input_survey.harness import NAN, Case, Mishandled, _probe


_GEN_CFG = dict(vocab_size=256, hidden_size=16, num_layers=2, num_heads=2, q_lora_rank=8, kv_lora_rank=8,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, first_k_dense=1,
                dense_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=8,
                num_experts_per_tok=2, max_position_embeddings=32)


@functools.cache
def _model() -> models.Transformer:
  """Random weights filled from numpy over an abstract model: eager init would compile a kernel per shape."""
  cfg = models.ModelConfig(**_GEN_CFG)
  rng = np.random.default_rng(0)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape = var.get_value().shape
    if isinstance(var, RouterBias):
      value = np.zeros(shape)
    elif str(path[-1]) == "scale":
      value = np.ones(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


_PROMPTS = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)  # the one shape every case uses


def _generate(ids=None, max_new_tokens=3, **kwargs):
  """generate_full with a probe on its compiled loop: reaching it is recorded, and then it really runs."""
  real = decode._generate_jit

  def probed(*args, **kw):
    _probe["reached"] = True
    return real(*args, **kw)

  def run():
    _probe["armed"] = True
    with mock.patch.object(decode, "_generate_jit", probed):
      out = inference.generate_full(_model(), _PROMPTS if ids is None else ids, max_new_tokens, **kwargs)
    return f"generated {np.asarray(out.tokens).tolist()}"
  return run


def _complete(prompts, **kwargs):
  return lambda: sample.complete(_model(), tokenizers.ByteTokenizer(), prompts, **kwargs)


def _sample(prompt, **kwargs):
  return lambda: sample.sample(_model(), tokenizers.ByteTokenizer(), prompt, **kwargs)


def _clipped_max_new_tokens():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    n = sample.max_new_tokens_that_fit(_model(), 10, 100)
  if n != 22 or "WARNING" not in out.getvalue():
    raise Mishandled(f"max_new_tokens became {n}; printed {out.getvalue()!r}")
  return "generates 22 = 32 positions - 10, with a warning"


def generation_cases() -> list[Case]:
  bad_ids = _PROMPTS.copy()
  bad_ids[1, 2] = -3
  big_ids = _PROMPTS.copy()
  big_ids[0, 1] = 256

  def gen(name, says, ids=None, **kwargs):
    return Case("generation", name, _generate(ids, **kwargs), says=says)

  return [
      gen("empty prompt [2, 0]", ("input_ids", "(2, 0)"), ids=np.zeros((2, 0), np.int32)),
      gen("empty batch [0, 4]", ("input_ids", "(0, 4)"), ids=np.zeros((0, 4), np.int32)),
      gen("negative token id -3", ("input_ids", "-3"), ids=bad_ids),
      gen("token id 256 >= vocab 256", ("input_ids", "256"), ids=big_ids),
      gen("float token ids", ("input_ids", "float"), ids=_PROMPTS.astype(np.float32)),
      gen("1-D input_ids", ("input_ids", "(4,)"), ids=_PROMPTS[0]),
      gen("3-D input_ids", ("input_ids", "(1, 2, 4)"), ids=_PROMPTS[None]),
      gen("stop token 256 >= vocab", ("stop_tokens", "256"), stop_tokens=(256,)),
      gen("stop token -1", ("stop_tokens", "-1"), stop_tokens=(-1,)),
      gen("stop token 1.5", ("stop_tokens", "1.5"), stop_tokens=(1.5,)),
      gen("temperature -0.5", ("temperature", "-0.5"), temperature=-0.5),
      gen("temperature NaN", ("temperature", "nan"), temperature=NAN),
      gen("temperature '0.7' (a string)", ("temperature", "'0.7'"), temperature="0.7"),
      gen("top_p 0", ("top_p", "0"), temperature=1.0, top_p=0.0),
      gen("top_p 1.5", ("top_p", "1.5"), temperature=1.0, top_p=1.5),
      gen("top_k -1", ("top_k", "-1"), temperature=1.0, top_k=-1),
      gen("top_k 2.5", ("top_k", "2.5"), temperature=1.0, top_k=2.5),
      gen("repetition_penalty 0", ("repetition_penalty", "0"), repetition_penalty=0.0),
      gen("repetition_penalty -1.2", ("repetition_penalty", "-1.2"), repetition_penalty=-1.2),
      gen("max_new_tokens 0", ("max_new_tokens", "0"), max_new_tokens=0),
      gen("max_new_tokens -3", ("max_new_tokens", "-3"), max_new_tokens=-3),
      gen("max_new_tokens 2.5", ("max_new_tokens", "2.5"), max_new_tokens=2.5),
      gen("prompt_lengths 0", ("prompt_lengths", "0"), prompt_lengths=[4, 0]),
      gen("prompt_lengths 5 > length 4", ("prompt_lengths", "5"), prompt_lengths=[4, 5]),
      gen("prompt_lengths of the wrong shape", ("prompt_lengths", "(3,)"), prompt_lengths=[4, 4, 4]),
      gen("prompt_lengths as floats", ("prompt_lengths",), prompt_lengths=np.array([4.0, 2.5])),
      gen("cache 'paged' (unknown)", ("cache", "paged"), cache="paged"),
      gen("pad_id 2**40", ("pad_id",), pad_id=2**40),
      gen("seed 1.5 (not an int or key)", ("seed",), seed=1.5),
      Case("generation", "sample: prompts is one string", _complete("def f("), says=("prompts", "string")),
      Case("generation", "sample: no prompts", _complete([]), says=("prompts", "empty")),
      Case("generation", "sample: empty prompt, byte tokenizer (no BOS)", _complete([""]),
           says=("prompt 0", "no tokens")),
      Case("generation", "sample: prompt fills all 32 positions", _complete(["x" * 40]),
           says=("40", "32")),
      Case("generation", "sample: num_samples 0", _sample("def ", num_samples=0), says=("num_samples", "0")),
      Case("generation", "sample: max_new_tokens past the positions", _clipped_max_new_tokens, None),
  ]
