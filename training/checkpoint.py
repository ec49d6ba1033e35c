"""Orbax checkpoints of the train state and the data iterator, with resume and fallback.

Each checkpoint holds `state` (TrainState arrays, restorable onto any mesh by passing target
shardings) and `data` (the grain iterator state, so a resumed run sees exactly the samples the
uninterrupted run would). Saves are asynchronous; a checkpoint is only visible once complete.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
import time

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging


def _ignore_abandoned_reads() -> None:
  """Drops the noise that a failed restore leaves behind, and nothing else.

  When one array of a checkpoint fails to read, orbax's restore raises and closes its event loop while
  tensorstore reads of the other arrays are still in flight. Each of those reads later finishes by
  scheduling a callback on the closed loop, which raises `RuntimeError('Event loop is closed')` on a
  tensorstore thread, reported through `sys.unraisablehook`: hundreds of tracebacks that bury the
  real message (and can interleave with it). The reads have nowhere to deliver their data, so there
  is nothing to handle; this hook drops exactly those reports and passes every other one on.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_ignores_abandoned_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook._ignores_abandoned_reads = True
  sys.unraisablehook = hook


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions, ...); says which and what is left."""


class _OrbaxTracebacks(py_logging.Filter):
  """Orbax logs each failure of its background save threads at ERROR with a traceback, several times
  over (one per thread and stage): hundreds of lines for one full disk. Keep its one-line messages;
  the traceback that matters is re-raised once, as a CheckpointSaveError."""

  def filter(self, record):
    if record.exc_info and "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def _quiet_orbax_tracebacks() -> None:
  logger = py_logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxTracebacks) for f in logger.filters):
    logger.addFilter(_OrbaxTracebacks())


class Checkpointer:

  def __init__(self, directory: str, keep: int, *, async_save: bool = True):
    _quiet_orbax_tracebacks()
    self.directory = os.path.abspath(directory)
    self._pending = None  # step of a save that may still be running in the background
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                        "data": grain.checkpoint.CheckpointHandler()})

  @contextlib.contextmanager
  def _saving(self, step: int | None):
    """Turns a failed (possibly earlier, asynchronous) save into one CheckpointSaveError line."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - whatever broke the write, the run cannot go on safely
      failed = self._pending if self._pending is not None else step
      self._pending = None
      cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      hint = " (disk full?)" if "RESOURCE_EXHAUSTED" in cause or "No space left" in cause else ""
      try:
        self.manager.reload()
        latest = self.manager.latest_step()
      except Exception:  # noqa: BLE001 - the directory itself may be gone
        latest = None
      newest = f"step {latest}" if latest is not None else "none"
      raise CheckpointSaveError(f"saving checkpoint {failed} to {self.directory} failed{hint}: {cause}. The "
                                f"newest complete checkpoint is {newest}.") from None

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    if getattr(state, "base_params", None):  # a LoRA run's frozen base: its init_from holds it
      state = state.replace(base_params={})
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:  # None: a run whose data position is a function of the step (GRPO)
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    args = ocp.args.Composite(**items)
    with self._saving(step):
      saved = self.manager.save(step, args=args, force=force)  # also waits for the previous save
    self._pending = step if saved else self._pending
    return saved

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest readable checkpoint into shardings given by `abstract_state`.

    Returns (state, step), or (None, None) when there is none. An unreadable checkpoint (corrupt or
    partial) is reported and the previous one is tried; once one restores, the unreadable newer ones
    are renamed to `<step>.unreadable-<time>` so the resumed run can save those steps again. If none
    restores (e.g. the model config changed), raises instead of silently starting over.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    # Before the first attempt: an abandoned read can report while a failed restore's error is still
    # propagating, before any except clause runs.
    _ignore_abandoned_reads()
    unreadable = []
    for step in steps:
      try:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); falling back to the "
                        "previous one", step, self.directory, type(e).__name__, str(e)[:300])
        print(f"WARNING: checkpoint {step} is unreadable ({type(e).__name__}); falling back to the previous one")
        unreadable.append(step)
        continue
      if unreadable:
        self._set_aside(unreadable)
      return restored["state"], step
    if unreadable:
      raise ValueError(f"none of the checkpoints {unreadable} in {self.directory} can be restored (see the "
                       "warnings above; a changed model config does this too). Move them away to start over.")
    return None, None

  def _set_aside(self, steps):
    """Renames unreadable step directories out of orbax's view (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = os.path.join(self.directory, str(step))
        os.rename(src, f"{src}.unreadable-{stamp}")
        logging.warning("moved the unreadable checkpoint %s aside to %s.unreadable-%s", src, src, stamp)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self.manager.reload()

  def wait(self):
    with self._saving(None):
      self.manager.wait_until_finished()
    self._pending = None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
