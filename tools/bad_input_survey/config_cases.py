"""Run config: fields, execution, mesh and model, through train_and_evaluate with jit patched."""

from __future__ import annotations

from training import config_check

from tools.bad_input_survey.harness import INF, NAN, Case, Mishandled, _config, _fails_to_train


_RUN_FIELDS = [
    # (case, fields, substrings the message must hold)
    ("keep_checkpoints 0", {"keep_checkpoints": 0}, ["keep_checkpoints"]),
    ("eval_batches -1", {"eval_batches": -1}, ["eval_batches", "-1"]),
    ("total_steps 0", {"total_steps": 0}, ["total_steps"]),
    ("total_steps -5", {"total_steps": -5}, ["total_steps", "-5"]),
    ("batch_size 0", {"batch_size": 0}, ["batch_size"]),
    ("seq_len 2", {"seq_len": 2}, ["seq_len"]),
    ("seq_len 128 > max_position_embeddings 64", {"seq_len": 128}, ["seq_len", "max_position_embeddings"]),
    ("grad_accum_steps 3 does not divide batch_size 8", {"grad_accum_steps": 3},
     ["grad_accum_steps", "batch_size"]),
    ("grad_accum_steps 0", {"grad_accum_steps": 0}, ["grad_accum_steps"]),
    ("log_every 0", {"log_every": 0}, ["log_every"]),
    ("eval_every -1", {"eval_every": -1}, ["eval_every"]),
    ("checkpoint_every 0", {"checkpoint_every": 0}, ["checkpoint_every"]),
    ("peak_flops_per_device -1", {"peak_flops_per_device": -1.0}, ["peak_flops_per_device"]),
    ("optim.peak_lr -1", {"optim.peak_lr": -1.0}, ["optim.peak_lr"]),
    ("optim.peak_lr 0", {"optim.peak_lr": 0.0}, ["optim.peak_lr"]),
    ("optim.peak_lr NaN", {"optim.peak_lr": NAN}, ["optim.peak_lr", "nan"]),
    ("optim.peak_lr inf", {"optim.peak_lr": INF}, ["optim.peak_lr", "inf"]),
    ("optim.min_lr_ratio 1.5", {"optim.min_lr_ratio": 1.5}, ["optim.min_lr_ratio"]),
    ("optim.warmup_fraction -0.1", {"optim.warmup_fraction": -0.1}, ["optim.warmup_fraction"]),
    ("optim.decay_start_fraction 2", {"optim.decay_start_fraction": 2.0}, ["optim.decay_start_fraction"]),
    ("optim.b1 1.0", {"optim.b1": 1.0}, ["optim.b1"]),
    ("optim.b2 -0.1", {"optim.b2": -0.1}, ["optim.b2"]),
    ("optim.b2 1.5", {"optim.b2": 1.5}, ["optim.b2"]),
    ("optim.eps 0", {"optim.eps": 0.0}, ["optim.eps"]),
    ("optim.clip_norm 0", {"optim.clip_norm": 0.0}, ["optim.clip_norm"]),
    ("optim.weight_decay -0.1", {"optim.weight_decay": -0.1}, ["optim.weight_decay"]),
    ("loss.balance_alpha -1", {"loss.balance_alpha": -1.0}, ["loss.balance_alpha"]),
    ("loss.mtp_lambda NaN", {"loss.mtp_lambda": NAN}, ["loss.mtp_lambda"]),
    ("loss.bias_update_speed inf", {"loss.bias_update_speed": INF}, ["loss.bias_update_speed"]),
    ("total_steps '100' (a string)", {"total_steps": "100"}, ["total_steps", "'100'"]),
    ("total_steps 6.0 (a float)", {"total_steps": 6.0}, ["total_steps", "6.0"]),
    ("batch_size True (a bool)", {"batch_size": True}, ["batch_size", "True"]),
    ("seq_len None", {"seq_len": None}, ["seq_len", "None"]),
    ("optim.peak_lr '3e-4' (a string)", {"optim.peak_lr": "3e-4"}, ["optim.peak_lr"]),
    ("optim.b1 True (a bool)", {"optim.b1": True}, ["optim.b1"]),
    ("seed '0' (a string)", {"seed": "0"}, ["seed"]),
    ("seed 1.5 (a float)", {"seed": 1.5}, ["seed"]),
    ("data.worker_count -1", {"data.worker_count": -1}, ["data.worker_count"]),
    ("data.dataset 'c4' (unknown)", {"data.dataset": "c4"}, ["data.dataset", "'c4'"]),
    ("data.dataset 'python_stdlib/foo'", {"data.dataset": "python_stdlib/foo"}, ["python_stdlib/foo"]),
    ("data.tokenizer 'bpe' (unknown)", {"data.tokenizer": "bpe"}, ["data.tokenizer", "'bpe'"]),
]

_EXECUTION_FIELDS = [
    ("execution.moe_backend 'megablocks'", {"execution.moe_backend": "megablocks"}, ["moe_backend", "megablocks"]),
    ("execution.remat_policy 'offload'", {"execution.remat_policy": "offload"}, ["remat_policy", "offload"]),
    ("execution.attention_impl 'flash'", {"execution.attention_impl": "flash"}, ["attention_impl", "flash"]),
    ("execution.capacity_factor 0", {"execution.capacity_factor": 0.0}, ["capacity_factor"]),
    ("execution.capacity_factor -1", {"execution.capacity_factor": -1.0}, ["capacity_factor"]),
    ("execution.capacity_factor NaN", {"execution.capacity_factor": NAN}, ["capacity_factor"]),
    ("execution.capacity_factor '1.25' (a string)", {"execution.capacity_factor": "1.25"}, ["capacity_factor"]),
    ("execution.foo (unknown field)", {"execution.foo": 1}, ["foo"]),
    ("attention_impl cudnn on CPU (bf16 model)",
     {"execution.attention_impl": "cudnn", "model.dtype": "bfloat16"}, ["cudnn", "GPU"]),
    ("attention_impl cudnn with float32", {"execution.attention_impl": "cudnn"}, ["cudnn", "float32"]),
]

_MESH = [
    ("mesh product 6 != 8 devices", {"mesh.data": 3, "mesh.fsdp": 2}, ["6 devices", "8 devices"]),
    ("mesh with two -1 axes", {"mesh.data": -1, "mesh.fsdp": -1}, ["-1", "data", "fsdp"]),
    ("mesh -1 axis cannot be inferred", {"mesh.data": -1, "mesh.fsdp": 3}, ["data", "3"]),
    ("mesh unknown axis 'pipeline'", {"mesh.pipeline": 2}, ["pipeline"]),
    ("mesh axis 0", {"mesh.data": 1, "mesh.tensor": 0}, ["tensor", "0"]),
    ("mesh axis '8' (a string)", {"mesh.data": "8"}, ["data", "'8'"]),
    ("num_heads 4 not divisible by tensor 8", {"mesh.data": 1, "mesh.tensor": 8}, ["num_heads", "tensor"]),
    ("n_routed_experts 6 not divisible by expert 4",
     {"model.n_routed_experts": 6, "mesh.data": 2, "mesh.expert": 4}, ["n_routed_experts", "expert"]),
    ("microbatch 4 does not split over 8 batch shards", {"grad_accum_steps": 2, "mesh.data": 8},
     ["microbatch", "8"]),
]

_MODEL = [
    ("odd qk_rope_head_dim 7", {"model.qk_rope_head_dim": 7}, ["qk_rope_head_dim", "7"]),
    ("num_experts_per_tok 9 > 8 experts", {"model.num_experts_per_tok": 9}, ["num_experts_per_tok", "9"]),
    ("n_group 3 does not divide 8 experts", {"model.n_group": 3}, ["n_group", "3"]),
    ("topk_group 3 > n_group 2", {"model.topk_group": 3}, ["topk_group"]),
    ("score_func 'relu'", {"model.score_func": "relu"}, ["score_func", "relu"]),
    ("mtp_depth 2", {"model.mtp_depth": 2}, [("mtp_depth", "MTP depth")]),
    ("first_k_dense 5 > num_layers 3", {"model.first_k_dense": 5}, ["first_k_dense"]),
    ("rope_type 'linear'", {"model.rope_type": "linear"}, ["rope_type", "linear"]),
    ("yarn without original_max_position_embeddings", {"model.rope_type": "yarn"},
     ["original_max_position_embeddings"]),
    ("unknown model field 'foo'", {"model.foo": 1}, ["foo"]),
    ("execution field moe_backend in the model section", {"model.moe_backend": "capacity"},
     ["moe_backend", "execution"]),
    ("dtype 'float33'", {"model.dtype": "float33"}, ["dtype", "float33"]),
    ("param_dtype 'int32' (not a float)", {"model.param_dtype": "int32"}, ["param_dtype"]),
    ("hidden_size 0", {"model.hidden_size": 0}, ["hidden_size"]),
    ("hidden_size '32' (a string)", {"model.hidden_size": "32"}, ["hidden_size"]),
    ("num_heads 0", {"model.num_heads": 0}, ["num_heads"]),
    ("q_lora_rank 0 (None means no q LoRA)", {"model.q_lora_rank": 0}, ["q_lora_rank"]),
    ("rms_norm_eps -1", {"model.rms_norm_eps": -1.0}, ["rms_norm_eps"]),
    ("rope_theta 0", {"model.rope_theta": 0.0}, ["rope_theta"]),
    ("vocab_size 0", {"model.vocab_size": 0}, ["vocab_size"]),
]

_SEVERAL = [
    ("five run fields at once: all listed",
     {"keep_checkpoints": 0, "eval_batches": -1, "optim.peak_lr": -1.0, "optim.b2": 1.0,
      "execution.remat_policy": "offload"},
     ["keep_checkpoints", "eval_batches", "optim.peak_lr", "optim.b2", "offload"]),
    ("a model and a run field at once: both listed", {"model.num_experts_per_tok": 9, "keep_checkpoints": 0},
     ["num_experts_per_tok", "keep_checkpoints"]),
    ("two model fields at once: both listed", {"model.qk_rope_head_dim": 7, "model.score_func": "relu"},
     ["qk_rope_head_dim", "score_func"]),
    ("a run field and a mesh problem at once: both listed", {"optim.eps": 0.0, "mesh.data": 3},
     ["optim.eps", "mesh"]),
]


def _documented_dataset_accepted():
  """data/sources.py documents python_stdlib/lib and python_stdlib/full; the run checks must let them by."""
  problems = config_check.run_config_problems(_config({"data.dataset": "python_stdlib/full"}))
  if problems:
    raise Mishandled(f"rejected: {problems[0]}")
  return "accepted"


def config_cases() -> list[Case]:
  groups = [("run config", _RUN_FIELDS), ("execution", _EXECUTION_FIELDS), ("mesh", _MESH),
            ("model config", _MODEL), ("several at once", _SEVERAL)]
  cases = [Case(area, name, _fails_to_train(fields), says=tuple(says))
           for area, rows in groups for name, fields, says in rows]
  at = [c.name for c in cases].index("data.tokenizer 'bpe' (unknown)")
  cases.insert(at, Case("run config", "data.dataset 'python_stdlib/full' (documented, valid)",
                        _documented_dataset_accepted, None))
  return cases
