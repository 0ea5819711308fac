"""Orbax checkpoints of the train state: the latest few, and the best by validation.

Layout under the workdir:
  checkpoints/<step>/   the latest ``keep`` checkpoints (state + JSON metadata)
  best/<step>/          the checkpoint with the best validation robust accuracy
  corrupt/<step>-<t>/   unreadable checkpoints, moved aside (never deleted)

Restoring tries the newest checkpoint first; if it cannot be read it is moved
to corrupt/ with a warning and the previous one is used, so a checkpoint torn
by a crash costs at most ``checkpoint.every_epochs`` epochs, never the run.
Saves are synchronous: when ``save`` returns, the checkpoint is on disk.

With several processes (jax.distributed), every process calls ``save`` and
``restore`` (Orbax coordinates them; the workdir must be on a file system all
hosts share); only process 0 moves unreadable checkpoints aside.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE_FIELDS = ("step", "params", "batch_stats", "opt_state")


def _sync(name: str) -> None:
  """A barrier across processes (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir could be restored into the current model."""


def _state_tree(state: Any) -> dict[str, Any]:
  return {k: getattr(state, k) for k in STATE_FIELDS}


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
  """Latest-``keep`` and best-by-validation checkpoints of a TrainState."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.keep = keep
    self._latest = _manager(os.path.join(self.workdir, "checkpoints"), keep)
    self._best = _manager(os.path.join(self.workdir, "best"), 1)

  def save(self, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves ``state`` (step, params, batch_stats, opt_state) with JSON ``meta``."""
    step = int(jax.device_get(state.step))
    managers = [self._latest] + ([self._best] if best else [])
    for mngr in managers:
      if step in mngr.all_steps():
        continue
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)))
      mngr.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def _restore(self, mngr: ocp.CheckpointManager, step: int, target: Any):
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_tree(target)), meta=ocp.args.JsonRestore()))
    return target.replace(**restored["state"]), dict(restored["meta"])

  def _move_aside(self, mngr: ocp.CheckpointManager, step: int) -> str:
    src = os.path.join(str(mngr.directory), str(step))
    dst = os.path.join(self.workdir, "corrupt", f"{os.path.basename(str(mngr.directory))}-"
                       f"{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    _sync(f"checkpoint-moved-aside-{step}")  # the others reload after process 0 moved it
    mngr.reload()
    return dst

  def restore(self, target: Any, *, best: bool = False) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint into ``target``'s structure.

    Returns (state, meta), or None if there is no checkpoint at all. An
    unreadable checkpoint is moved to corrupt/ and the previous one is tried.
    Raises CheckpointError if checkpoints exist but none can be restored.
    """
    mngr = self._best if best else self._latest
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        return self._restore(mngr, step, target)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        if self._is_structure_mismatch(e):
          break
        dst = self._move_aside(mngr, step)
        logging.warning("Checkpoint at step %d in %s is unreadable (%s); moved it to %s and "
                        "falling back to the previous checkpoint.", step, mngr.directory,
                        type(e).__name__, dst)
        if jax.process_index() == 0:
          print(f"WARNING: checkpoint at step {step} is unreadable ({type(e).__name__}); "
                f"moved to {dst}; falling back to the previous one.", flush=True)
    raise CheckpointError(
        f"No checkpoint in {mngr.directory} could be restored into the current model "
        f"({'; '.join(errors)}). If the workdir belongs to another model or config, use a new "
        f"--workdir; the unreadable checkpoints are kept under {self.workdir}/corrupt.")

  @staticmethod
  def _is_structure_mismatch(e: Exception) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in ("shape", "structure", "mismatch", "does not match"))
