"""Generate tiny golden HF DeepSeek checkpoints plus float32 reference logits.

What it writes (under --out, normally tests/fixtures/hf):
  <name>/                        an HF checkpoint directory as save_pretrained writes it (config.json + safetensors)
  <name>.reference.safetensors   input_ids [2,40] int32, logits [2,40,V], logits_prefix [2,12,V] (first 12 tokens
                                 run alone) and, for V3, mtp_logits [2,39,V] (row i predicts token i+2)
Fixtures: v3_tiny (sharded, MTP layer stored DeepSeek-style at model.layers.<num_hidden_layers>.*),
v3_fp8 (same weights, block-fp8 linears + weight_scale_inv), v2_lite_tiny and v2_tiny (legacy `rope_scaling`).

Why a non-default init: HF's std-0.02 init makes every router nearly uniform and every norm weight 1, so a loader
that swaps experts, drops the V3 correction bias or ignores a norm weight still matches.  Here linears are
N(0, 1/fan_in), norms 1 + 0.2*N, routers have std 2/sqrt(hidden) and the V3 bias is 0.1*N; seeds are scanned
(deterministically) until every top-k / top-group choice has a score gap > MIN_MARGIN, so float32 noise in our
reimplementation can never flip a routing decision, and every routed expert is used.

Run from the repo root with a Python 3.11 virtualenv with torch 2.13 (CPU), transformers, safetensors
and numpy (the project venv has no torch):
    python -m tools.make_hf_fixtures --out tests/fixtures/hf
The script is deterministic: rerunning it reproduces byte-identical files.
"""

import argparse
import copy
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from transformers import logging as hf_logging
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

BATCH, SEQ, PREFIX = 2, 40, 12
MIN_MARGIN = 1e-4
IMPL = dict(attn_implementation="eager", experts_implementation="eager")  # CPU defaults may pick sdpa/grouped_mm
FP8_BLOCK, FP8_MAX = 128, 448.0
# Linear weights DeepSeek ships in fp8.  eh_proj is deliberately absent: the released V3 checkpoint keeps it in bf16
# (vLLM builds it as a plain nn.Linear), so the loader must handle mixed fp8/high-precision layers.
FP8_LINEAR = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")

COMMON = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1,
              intermediate_size=80, moe_intermediate_size=16, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=12,
              max_position_embeddings=64, rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False)
V3 = dict(COMMON, vocab_size=97, q_lora_rank=24, qk_rope_head_dim=8, n_routed_experts=16, n_shared_experts=1,
          num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_mtp_layers=1,
          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                               beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8))  # mscale != all_dim
# V2 fixtures use the legacy top-level rope_theta + rope_scaling{type: yarn} layout of the released V2 configs.
V2_LITE = dict(COMMON, vocab_size=89, q_lora_rank=None, qk_rope_head_dim=8, n_routed_experts=8, n_shared_experts=2,
               num_experts_per_tok=3, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
               routed_scaling_factor=1.0, mlp_bias=False, rope_theta=10000.0,
               rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32,
                                 beta_slow=1, mscale=0.707, mscale_all_dim=0.707))
# v2_tiny: rope dim 16 with original length 32 gives a YaRN ramp with a fractional entry ([1, .5, 0, ...]),
# which the 8-dim / 16-position setups above (ramp [1, 0, 0, 0]) cannot exercise.
V2 = dict(COMMON, vocab_size=101, q_lora_rank=24, qk_rope_head_dim=16, n_routed_experts=16, n_shared_experts=2,
          num_experts_per_tok=4, topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False,
          routed_scaling_factor=16.0, mlp_bias=False, rope_theta=10000.0,
          rope_scaling=dict(type="yarn", factor=2.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                            mscale=1.0, mscale_all_dim=1.0))
# Keys the released configs carry that HF's config classes do not define; kept so a loader can dispatch on them.
EXTRA_V3 = dict(topk_method="noaux_tc", scoring_func="sigmoid")
EXTRA_V2 = dict(scoring_func="softmax")


def randomize_(named, gen, hidden):
    """Overwrite parameters/buffers in place with the 'hard' init described in the module docstring."""
    for name, t in sorted(named, key=lambda kv: kv[0]):
        n = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if "norm" in name.rsplit(".", 2)[-2]:                        # every RMSNorm weight
            val = 1.0 + 0.2 * n
        elif name.endswith("e_score_correction_bias"):
            val = 0.1 * n
        elif name.endswith("mlp.gate.weight"):                       # router: decisive, not uniform
            val = n * 2.0 / math.sqrt(hidden)
        elif name.endswith("embed_tokens.weight"):
            val = n
        else:                                                        # linears, lm_head, fused experts [E,out,in]
            val = n / math.sqrt(t.shape[-1])
        t.data.copy_(val)


def build(spec, seed):
    cfg_kw = {k: v for k, v in spec.items() if k not in ("rope_scaling", "rope_theta")}
    if "rope_scaling" in spec:  # V2 is built in memory with the equivalent new-style dict
        legacy = {k: v for k, v in spec["rope_scaling"].items() if k != "type"}
        cfg_kw["rope_parameters"] = dict(legacy, rope_type="yarn", rope_theta=spec["rope_theta"])
    is_v3 = "num_mtp_layers" in spec
    cfg = (DeepseekV3Config if is_v3 else DeepseekV2Config)(**cfg_kw)
    model = (DeepseekV3ForCausalLM if is_v3 else DeepseekV2ForCausalLM)._from_config(cfg, dtype=torch.float32, **IMPL)
    gen = torch.Generator().manual_seed(seed)
    buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    randomize_(list(model.named_parameters()) + buffers, gen, cfg.hidden_size)
    mtp = None
    if is_v3:
        mtp = MtpModel(model, cfg.num_mtp_layers)  # shares embed/lm_head/rotary with the main model
        own = [(n, t) for n, t in list(mtp.named_parameters()) + list(mtp.named_buffers()) if n.startswith("layers.")]
        randomize_(own, gen, cfg.hidden_size)
    return model.eval(), (mtp.eval() if mtp is not None else None)


def router_margin(router, x):
    """Min gap between the last chosen and first rejected score (experts, and groups where used); chosen experts."""
    x = x.reshape(-1, router.hidden_dim).float()
    logits = x @ router.weight.float().T
    v3 = isinstance(router, DeepseekV3TopkRouter)
    score = logits.sigmoid() + router.e_score_correction_bias if v3 else logits.softmax(-1)
    gaps, flipped = [], 0
    grouped = v3 or router.topk_method == "group_limited_greedy"
    if grouped and router.topk_group < router.num_group:
        per_group = score.view(len(score), router.num_group, -1)
        gscore = per_group.topk(2, dim=-1).values.sum(-1) if v3 else per_group.max(-1).values
        gsorted = gscore.sort(-1, descending=True).values
        gaps.append(gsorted[:, router.topk_group - 1] - gsorted[:, router.topk_group])
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(router.topk_group, -1).indices, True)
        score = score.masked_fill(~keep.repeat_interleave(router.num_experts // router.num_group, 1),
                                  float("-inf") if v3 else 0.0)
    ssorted = score.sort(-1, descending=True).values
    gaps.append(ssorted[:, router.top_k - 1] - ssorted[:, router.top_k])
    chosen = score.topk(router.top_k, -1).indices
    if v3:  # how many tokens would route differently if the correction bias were dropped
        no_bias = logits.sigmoid().topk(router.top_k, -1).indices.sort(-1).values
        flipped = int((no_bias != chosen.sort(-1).values).any(-1).sum())
    return min(float(g.min()) for g in gaps), set(chosen.flatten().tolist()), flipped


def mtp_logits(mtp, h_BTD, ids_BT, first_pos):
    """MTP depth 1: token t+1's embedding with main hidden t -> logits predicting token t+2 (positions first_pos..)."""
    pos_1S = torch.arange(first_pos, first_pos + ids_BT.shape[1] - 1)[None]
    hid_BSD = mtp.forward_layer(0, h_BTD[:, :-1], pos_1S, None, input_ids=ids_BT[:, 1:])  # incl. post_norm
    return mtp._project_to_logits(hid_BSD)


@torch.no_grad()
def run_all(model, mtp, ids_BT):
    """All reference outputs + routing statistics gathered by hooks on every router (main and MTP)."""
    stats = {"margin": float("inf"), "flipped": 0, "tokens": 0}
    used = {}

    def hook(mod, args, _out):
        margin, chosen, flipped = router_margin(mod, args[0])
        stats["margin"] = min(stats["margin"], margin)
        stats["flipped"] += flipped
        stats["tokens"] += args[0].shape[:-1].numel()
        used.setdefault(id(mod), (mod.num_experts, set()))[1].update(chosen)

    mods = [m for m in list(model.modules()) + (list(mtp.modules()) if mtp else []) if type(m).__name__.endswith("TopkRouter")]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:  # the prefix run and both MTP runs are routed through the hooks too
        out = {"logits": model(ids_BT).logits, "logits_prefix": model(ids_BT[:, :PREFIX]).logits}
        if mtp is not None:
            h_BTD = model.model(ids_BT).last_hidden_state  # final-normed, as HF's MtpModel consumes it
            out["mtp_logits"] = mtp_logits(mtp, h_BTD, ids_BT, 1)
            shifted = mtp_logits(mtp, h_BTD, ids_BT, 0)  # RoPE is relative: position offset must not matter
            stats["mtp_pos_diff"] = float((shifted - out["mtp_logits"]).abs().max())
            assert stats["mtp_pos_diff"] < 1e-5, "MTP position convention mismatch"
            short = mtp_logits(mtp, h_BTD[:, :PREFIX], ids_BT[:, :PREFIX], 1)
            assert (short - out["mtp_logits"][:, : PREFIX - 1]).abs().max() < 1e-5, "MTP attention is not causal"
    finally:
        for h in handles:
            h.remove()
    stats["prefix_diff"] = float((out["logits_prefix"] - out["logits"][:, :PREFIX]).abs().max())
    assert stats["prefix_diff"] < 1e-5, "main model is not causal"
    stats["all_experts_used"] = all(len(s) == n for n, s in used.values())
    return {k: v.float().numpy() for k, v in out.items()}, stats


def fp8_quantize(w):
    """Per-128x128-block e4m3 quantisation, DeepSeek convention: w ~= fp8 * scale_inv (scale_inv broadcast per block)."""
    out, inp = w.shape
    rb, cb = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(rb * FP8_BLOCK, cb * FP8_BLOCK)
    padded[:out, :inp] = w
    blocks = padded.view(rb, FP8_BLOCK, cb, FP8_BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(rb * FP8_BLOCK, cb * FP8_BLOCK)[:out, :inp].contiguous(), scale_inv.float()


def fp8_dequantize(q, scale_inv):
    full = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


@torch.no_grad()
def fake_quant_(module):
    """In-memory fp8 round trip (fused experts quantised per expert and per gate/up half, as they are stored)."""
    for name, p in module.named_parameters():
        mats = ([p] if FP8_LINEAR.search(name) else [half for e in p for half in e.chunk(2, dim=0)]
                if name.endswith("experts.gate_up_proj") else list(p) if name.endswith("experts.down_proj") else [])
        for w in mats:  # views into p, so copy_ writes through
            w.copy_(fp8_dequantize(*fp8_quantize(w)))


def mtp_checkpoint_tensors(model, mtp, n):
    """MTP weights in DeepSeek's released layout at model.layers.<n>.*, experts split per expert like save_pretrained."""
    pre, out = f"model.layers.{n}.", {}
    for name, t in mtp.layers[0].state_dict().items():
        name = {"post_norm.weight": "shared_head.norm.weight"}.get(name, name).replace("mtp_block.", "")
        if name.endswith("experts.gate_up_proj"):  # fused [E, 2I, H] = [gate; up] along dim 1
            gate_EIH, up_EIH = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{pre}mlp.experts.{e}.gate_proj.weight"] = gate_EIH[e]
                out[f"{pre}mlp.experts.{e}.up_proj.weight"] = up_EIH[e]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{pre}mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[pre + name] = t
    out[pre + "shared_head.head.weight"] = model.lm_head.weight
    out[pre + "embed_tokens.weight"] = model.model.embed_tokens.weight
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def shard_files(d):
    index = d / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None


def rewrite_shards(d, fn):
    """Apply fn(filename, tensors) -> tensors to every safetensors file of d and rebuild the index."""
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    files = shard_files(d) or ["model.safetensors"]
    weight_map, total = {}, 0
    for f in files:
        tensors = fn(f, load_file(d / f))
        save_file(tensors, d / f, metadata={"format": "pt"})
        (d / f).chmod(0o644)
        weight_map.update({k: f for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index:
        index["metadata"]["total_size"] = total
        index["metadata"].pop("total_parameters", None)  # would be ambiguous once fp8 + scales are mixed in
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def edit_config(d, drop=(), **changes):
    cfg = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in drop} | changes
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def load_and_run(d, is_v3, ids_BT):
    """Reload a checkpoint dir exactly like a user would and compute the reference outputs from it."""
    cls = DeepseekV3ForCausalLM if is_v3 else DeepseekV2ForCausalLM
    model = cls.from_pretrained(d, dtype=torch.float32, **IMPL).eval()
    mtp = None
    if is_v3:
        # HF hard-codes the MTP key pattern to layer 61 (the real V3 depth); point it at our layer N.
        model._keys_to_ignore_on_load_unexpected = {rf"model\.layers\.{model.config.num_hidden_layers}\..*"}
        mtp = MtpModel.from_pretrained(model).eval()
    return model, mtp, run_all(model, mtp, ids_BT)


def make_ids(vocab):  # fixed seed; both ends of the vocab appear
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    ids[0, 3], ids[1, 0] = vocab - 1, 0
    return ids


def pick_seed(spec, base, ids, also_fp8=False):
    for seed in range(base, base + 200):
        model, mtp = build(spec, seed)
        variants = [(model, mtp)] + ([copy.deepcopy((model, mtp))] if also_fp8 else [])
        for m, t in variants[1:]:  # v3_fp8 shares the weights, so its dequantised model must route cleanly too
            fake_quant_(m), fake_quant_(t.layers)
        stats = [run_all(m, t, ids)[1] for m, t in variants]
        if all(s["margin"] > MIN_MARGIN and s["all_experts_used"] and (not mtp or s["flipped"]) for s in stats):
            return seed, model, mtp
    raise RuntimeError("no seed with clean routing found")


def write_reference(out_dir, name, ids, outputs, stats):
    path = out_dir / f"{name}.reference.safetensors"
    save_numpy({"input_ids": ids.numpy().astype(np.int32), **outputs}, str(path))
    path.chmod(0o644)
    ckpt = sum(f.stat().st_size for f in (out_dir / name).iterdir())
    print(f"{name}: logit std {outputs['logits'].std():.3f}, min routing margin {stats['margin']:.2e}, "
          f"checkpoint {ckpt / 1024:.0f} KiB, reference {path.stat().st_size / 1024:.0f} KiB\n  {stats}")


def make_v3(out_dir):
    ids = make_ids(V3["vocab_size"])
    seed, model, mtp = pick_seed(V3, 1000, ids, also_fp8=True)
    expect, _ = run_all(model, mtp, ids)
    d = out_dir / "v3_tiny"
    model.save_pretrained(d, max_shard_size="200KB")
    assert len(shard_files(d) or []) >= 2, "v3_tiny must be sharded"
    last = shard_files(d)[-1]
    extra = mtp_checkpoint_tensors(model, mtp, model.config.num_hidden_layers)
    rewrite_shards(d, lambda f, t: {**t, **extra} if f == last else t)  # MTP goes into the last shard, as released
    edit_config(d, **EXTRA_V3)
    _, loaded_mtp, (outputs, stats) = load_and_run(d, True, ids)
    for k, v in mtp.state_dict().items():  # HF's own MTP loader must read back exactly what we generated
        assert torch.equal(v, loaded_mtp.state_dict()[k]), k
    assert all(np.array_equal(expect[k], outputs[k]) for k in expect), "reload changed the outputs"
    write_reference(out_dir, "v3_tiny", ids, outputs, dict(stats, seed=seed, shards=len(shard_files(d))))

    # v3_fp8: same tensors, linears stored as e4m3 + per-block weight_scale_inv.
    q = out_dir / "v3_fp8"
    shutil.copytree(d, q)

    def quantize(_f, tensors):  # "<...>.weight" -> fp8 "<...>.weight" + fp32 "<...>.weight_scale_inv"
        return dict(kv for k, t in tensors.items()
                    for kv in (zip((k, k + "_scale_inv"), fp8_quantize(t)) if FP8_LINEAR.search(k) else [(k, t)]))

    rewrite_shards(q, quantize)
    edit_config(q, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [FP8_BLOCK, FP8_BLOCK]})
    # Reference = float32 model holding the dequantised weights (not transformers' fp8 kernels).
    with tempfile.TemporaryDirectory() as tmp:
        deq = Path(tmp) / "deq"
        shutil.copytree(q, deq)
        edit_config(deq, drop=("quantization_config",))

        def dequantize(_f, tensors):
            return {k: fp8_dequantize(t, tensors[k + "_scale_inv"]) if FP8_LINEAR.search(k) else t
                    for k, t in tensors.items() if not k.endswith("_scale_inv")}

        rewrite_shards(deq, dequantize)
        _, _, (outputs, stats) = load_and_run(deq, True, ids)
    fake_quant_(model), fake_quant_(mtp.layers)
    expect, _ = run_all(model, mtp, ids)
    assert all(np.abs(expect[k] - outputs[k]).max() < 1e-5 for k in expect), "fp8 dequant path disagrees"
    write_reference(out_dir, "v3_fp8", ids, outputs, dict(stats, seed=seed))


def make_v2(out_dir, name, spec, base_seed):
    ids = make_ids(spec["vocab_size"])
    seed, model, _ = pick_seed(spec, base_seed, ids)
    expect, _ = run_all(model, None, ids)
    d = out_dir / name
    model.save_pretrained(d)  # single model.safetensors
    (d / "model.safetensors").chmod(0o644)
    # transformers 5 writes rope_parameters; restore the released V2 layout (and drop derived head dims).
    edit_config(d, drop=("rope_parameters", "head_dim", "qk_head_dim"), rope_theta=spec["rope_theta"],
                rope_scaling=spec["rope_scaling"], **EXTRA_V2)
    loaded, _, (outputs, stats) = load_and_run(d, False, ids)
    legacy_rope = {k: v for k, v in loaded.config.rope_parameters.items() if k != "type"}
    assert legacy_rope == model.config.rope_parameters, (legacy_rope, model.config.rope_parameters)
    assert all(np.array_equal(expect[k], outputs[k]) for k in expect), "legacy config changed the outputs"
    write_reference(out_dir, name, ids, outputs, dict(stats, seed=seed))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/hf"))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # the expected "unexpected model.layers.N.*" load report is just noise here
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # one thread: reduction order (hence every bit of the references) is reproducible
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("v3_tiny", "v3_fp8", "v2_lite_tiny", "v2_tiny"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    make_v3(args.out)
    make_v2(args.out, "v2_lite_tiny", V2_LITE, 2000)
    make_v2(args.out, "v2_tiny", V2, 3000)


if __name__ == "__main__":
    main()
