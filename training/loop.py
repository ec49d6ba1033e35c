"""The training loop: `train_and_evaluate(config, workdir)` is what train.py calls."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
from absl import logging
from jax.experimental import multihost_utils

import models
from data import pipeline, sources
from models import counting
from training import adapters
from training import checkpoint as ckpt_lib
from training import distill
from training import eval as eval_lib
from training import grpo_trainer
from training import metrics as metrics_lib
from training import optimizer as optim_lib
from training import run_state
from training import step as step_lib
from training import weights
from training import workdir as workdir_lib
from training.validate import validate_run

import sharding


class NonFiniteLossError(RuntimeError):
  pass


def train_and_evaluate(config, workdir: str, *, start_over: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the last metrics.

  The workdir is locked for the run; resuming must keep the model and tokenizer its config.json
  records, and a workdir with a history but no checkpoint needs start_over (training/workdir.py)."""
  jax.config.update("jax_threefry_partitionable", True)
  model_cfg, mesh, execution = validate_run(config, workdir)
  lock = workdir_lib.Lock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    if jax.process_index() == 0:
      workdir_lib.check_resume(workdir, config, model_cfg, start_over=start_over)
    return _train(config, model_cfg, mesh, execution, workdir)
  finally:
    lock.release()


def _train(config, model_cfg, mesh, execution, workdir: str) -> dict:
  tokenizer = pipeline.make_tokenizer(config.data)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} exceeds model vocab_size {model_cfg.vocab_size}")
  is_main = jax.process_index() == 0

  schedule = optim_lib.learning_rate_schedule(config.optim, config.total_steps)
  tx = optim_lib.make_optimizer(config.optim, config.total_steps, lora_b_lr_ratio=adapters.b_lr_ratio(config))
  rs = run_state.plan(config, model_cfg, tx, mesh)
  rules = config.get("sharding_rules")
  batch_sharding = sharding.batch_sharding(mesh, rules)

  if jax.process_count() > 1:  # first use builds the dataset: one process builds, the others wait
    if jax.process_index() == 0:
      sources.prepare(config.data)
    multihost_utils.sync_global_devices("dataset built")
  grpo_run = config.get("objective", "pretrain") == "grpo"
  train_config, teacher = config, None
  if distill.is_sequence(config):  # the student trains on the teacher's completions, written once
    if is_main:
      distill.write_teacher_data(config, workdir, tokenizer, mesh, execution)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("teacher data written")
    train_config = _with_data(config, distill.student_data_config(config, workdir))
  elif distill.is_logits(config):
    teacher = distill.teacher_model(config, mesh)
    distill.check_vocab(model_cfg, teacher[0].cfg)
  # A GRPO run draws its prompts as a pure function of (seed, step): no data iterator to checkpoint.
  train_iter = None if grpo_run else pipeline.make_iterator(
      train_config.data, split="train", seq_len=config.seq_len, global_batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed)
  flops_per_token = counting.train_flops_per_token(model_cfg, config.seq_len)  # abstract init: outside the mesh
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  with jax.set_mesh(mesh):
    state, start = checkpointer.restore_latest(
        ckpt_lib.abstract_with_shardings(rs.abstract, rs.checkpoint_shardings), train_iter)
  # Outside the mesh context: reading init_from builds abstract models, whose axis names are not mesh axes.
  if state is None:  # a resumed run continues itself, never its init_from
    start = 0
    first_batch = None
    if rs.lora_cfg is not None and rs.lora_cfg.init == "gradient":  # the batch step 1 will see, from its own iterator
      first_batch = eval_lib.global_batch(next(pipeline.make_iterator(
          train_config.data, split="train", seq_len=config.seq_len, global_batch_size=config.batch_size,
          process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed)), batch_sharding)
    state = run_state.initial_state(rs, config, tx, mesh, first_batch=first_batch, execution=execution)
    origin = f"from {config.init_from}" if config.get("init_from") else "a fresh model"
    _say(is_main, f"initialised {origin} in {workdir}")
  else:
    state = run_state.attach_base(rs, state, config, mesh)
    _say(is_main, f"resumed from the checkpoint at step {start} in {workdir}")
  counts = run_state.param_counts(rs, state)
  _say(is_main, f"parameters: {counts['params/trainable']:,} trainable of {counts['params/total']:,}"
       + (f" (LoRA rank {rs.lora_cfg.rank})" if rs.lora_cfg else ""))
  if grpo_run:
    trainer = grpo_trainer.GrpoTrainer(config, rs, tx, schedule, mesh, execution, tokenizer, batch_sharding)
    stepper = Stepper(trainer.step, trainer.evaluate, None, trainer.tokens_per_step)
  else:
    teacher_args = () if teacher is None else (teacher[1:],)
    with jax.set_mesh(mesh):
      train_step = jax.jit(
          step_lib.make_train_step(rs.modeldef, tx, schedule, train_config, execution,
                                   teacher=None if teacher is None else teacher[0]),
          in_shardings=(rs.shardings, batch_sharding, *jax.tree.map(lambda x: x.sharding, teacher_args)),
          out_shardings=(rs.shardings, None), donate_argnums=(0,))
      eval_step = jax.jit(eval_lib.make_eval_step(rs.modeldef, tokenizer.token_byte_lengths(), execution,
                                                  masked=step_lib.is_masked(train_config), lora_cfg=rs.lora_cfg),
                          in_shardings=(rs.shardings, batch_sharding))

    def advance(state, step):
      del step
      with jax.set_mesh(mesh):
        return train_step(state, eval_lib.global_batch(next(train_iter), batch_sharding), *teacher_args)

    def evaluate(state):
      with jax.set_mesh(mesh):
        return eval_lib.evaluate(eval_step, state, train_config, batch_sharding)[0]

    stepper = Stepper(advance, evaluate, train_iter, config.batch_size * config.seq_len)
  return _loop(config, model_cfg, workdir, flops_per_token, state, start, stepper, checkpointer, is_main, counts)


def _with_data(config, data):
  """A copy of `config` with another data section (what the steps read; config.json keeps the original)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data = data
  return config


class Stepper(NamedTuple):
  """What the loop drives, per objective: `advance(state, step) -> (state, metrics)` takes step `step`
  (1-based); `evaluate(state) -> scalars`; the data iterator checkpointed beside the state (None when
  the objective has none); tokens processed per step (for tokens/s)."""
  advance: Callable
  evaluate: Callable
  data_iterator: Any
  tokens_per_step: int


def _close_quietly(checkpointer) -> None:
  try:
    checkpointer.close()
  except Exception as e:  # noqa: BLE001 - secondary to the error being raised
    logging.warning("while stopping after an error: %s", e)


def _say(is_main: bool, line: str) -> None:
  """A line of the run's own story: on the console (third-party INFO logs stay off it) and in the log."""
  logging.info(line)
  if is_main:
    print(line, flush=True)


def _write_run_config(config, model_cfg: models.ModelConfig, workdir: str) -> None:
  """WORKDIR/config.json, which eval.py and notebooks rebuild the run from; the model section is
  `ModelConfig.to_dict()` (dtypes by name) so it reads back exactly."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = model_cfg.to_dict()
    if config.get("init_from"):  # eval.py and merges reload a LoRA run's base from here, from any directory
      source = weights.parse_source(config.init_from)
      config.init_from = str(source)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))


def _loop(config, model_cfg, workdir, flops_per_token, state, start, stepper: Stepper, checkpointer, is_main,
          param_counts) -> dict:
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  if start == 0:
    writer.write_hparams(config)
    writer.write(0, param_counts)
  if is_main:
    _write_run_config(config, model_cfg, workdir)
  device = jax.devices()[0]
  progress = metrics_lib.Progress(
      config.total_steps, start, flops_per_token,
      metrics_lib.peak_flops(device.device_kind, config.peak_flops_per_device), jax.device_count())
  stop = {"signal": None}
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  last_good_ckpt = start if start else None
  scalars: dict = {}
  pending = None  # (step, metrics) of the step dispatched last, pulled after the next dispatch

  def check(step_metrics, step):
    # A finite loss with non-finite gradients still poisons this step's update (and its checkpoint).
    loss, grad_norm = float(step_metrics["train/loss"]), float(step_metrics["train/grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      raise NonFiniteLossError(
          f"train/loss became {loss} (grad norm {grad_norm}) at step {step}; stopping. The last good "
          f"checkpoint is {'step %d' % last_good_ckpt if last_good_ckpt else 'none'} in {checkpointer.directory}.")

  try:
    for step in range(start + 1, config.total_steps + 1):
      state, step_metrics = stepper.advance(state, step)
      if pending is not None:
        check(*pending)
      pending = (step_metrics, step)
      progress.add_tokens(stepper.tokens_per_step)
      if step % config.log_every == 0 or step == config.total_steps:
        check(step_metrics, step)
        scalars = writer.write(step, {**jax.device_get(step_metrics), **progress.perf(step)})
        if is_main:
          logging.info(progress.line(step, scalars))
          print(progress.line(step, scalars), flush=True)
      if (config.eval_every and step % config.eval_every == 0) or step == config.total_steps:
        eval_scalars = stepper.evaluate(state)
        scalars.update(writer.write(step, eval_scalars))
        if is_main and eval_scalars:  # a GRPO run with no eval prompts evaluates nothing
          print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_scalars.items()), flush=True)
      final = step == config.total_steps
      if step % config.checkpoint_every == 0 or final or stop["signal"]:
        check(step_metrics, step)
        t0 = time.perf_counter()
        checkpointer.save(step, state, stepper.data_iterator, force=True)
        blocked_s = time.perf_counter() - t0  # how long the step loop waited: the rest is written in the background
        writer.write(step, {"checkpoint/blocked_s": blocked_s})
        _say(is_main, f"step {step}: checkpointing to {checkpointer.directory}/{step} "
             f"(the loop waited {blocked_s:.2f} s)")
        last_good_ckpt = step
      if stop["signal"]:
        logging.warning("received signal %s: checkpointed step %d and stopping", stop["signal"], step)
        break
  except BaseException:
    _close_quietly(checkpointer)  # the error in flight is the one to report
    raise
  else:
    checkpointer.close()  # the last save must land before the run reports success
  finally:
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)
  if is_main and scalars:  # a rerun of a finished run trains nothing: keep its final metrics
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(scalars, f, indent=1)
  return scalars
