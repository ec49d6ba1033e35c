"""Generation for DeepSeek models: absorbed-MLA (latent) or expanded KV caches, jitted prefill and
decode steps, and one compiled sampling loop.

    from inference import generate, quantize
    out = generate(model, input_ids, max_new_tokens=16, temperature=0.0)  # int32 [B, T] -> [B, T+16]
    out = generate(quantize(model, "int8"), input_ids, max_new_tokens=16)  # int8 weights, same compute dtype
"""

from inference.cache import CacheReport, KVCache, cache_bytes, cache_report, init_cache
from inference.decode import (Generation, decode_layers, decode_step, generate, generate_full,
                              jit_decode_step, jit_prefill, prefill)
from inference.quantize import quantize
from inference.sampling import SamplingConfig, sample

__all__ = [
    "CacheReport", "Generation", "KVCache", "SamplingConfig", "cache_bytes", "cache_report", "decode_layers",
    "decode_step",
    "generate", "generate_full", "init_cache", "jit_decode_step", "jit_prefill", "prefill", "quantize", "sample",
]
