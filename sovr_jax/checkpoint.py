"""Orbax checkpoints of the train state: the latest few, and the best by validation.

Layout under the workdir (names in ``sovr_jax.rundir``):
  checkpoints/<step>/   the latest ``keep`` checkpoints (state + JSON metadata)
  best/<step>/          the checkpoint with the best validation robust accuracy
  corrupt/<kind>-<step>-<time>/   unreadable checkpoints, moved aside (never deleted)

What a checkpoint guarantees:
* Only a finite state is saved: ``save`` refuses a state with a NaN or infinite value (or
  parameters that exploded past ``MAX_PARAM_NORM``) with a TrainingDivergedError, so the
  newest checkpoint is always a usable model.
* Its metadata holds a SHA-256 digest of every array of the state (``state_digest``), and
  every restore (training, export, evaluation) recomputes it: flipped bytes inside the array
  data, which Orbax itself restores without a word, make the checkpoint unreadable.
* An unreadable checkpoint (torn or unparsable metadata, truncated or corrupt array data, a
  digest mismatch) is moved to corrupt/ with a warning and the previous one is tried, so a
  crash or a bad disk costs at most ``checkpoint.every_epochs`` epochs, never the run.
* A checkpoint whose array metadata has another structure than the model (another
  architecture, or a version of sovr_jax that named its layers differently) is not
  corruption: it is left in place and the restore stops with a CheckpointError that names the
  first differing array. This is decided from the metadata's shapes, never from error text.
Saves are synchronous: when ``save`` returns, the checkpoint is on disk.

With several processes (jax.distributed), every process calls ``save`` and ``restore``
(Orbax coordinates them; the workdir must be on a file system all hosts share); only process
0 moves unreadable checkpoints aside.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from sovr_jax import rundir, sharding
from sovr_jax.errors import CheckpointError, TrainingDivergedError

STATE_FIELDS = ("step", "params", "batch_stats", "opt_state")
#: A global parameter norm above this means the run exploded, even if every value is finite
#: (weight decay keeps a trained network's norm in the tens to hundreds).
MAX_PARAM_NORM = 1e6
DIGEST_KEY = "state_sha256"


def _state_tree(state: Any) -> dict[str, Any]:
  return {k: getattr(state, k) for k in STATE_FIELDS}


def _host(x: Any) -> np.ndarray:
  """A replicated (or single-device) array on the host, also when it spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


def _host_leaves(state: Any) -> list[tuple[str, np.ndarray]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(_state_tree(state))
  return [(jax.tree_util.keystr(path), _host(leaf)) for path, leaf in flat]


def state_digest(leaves: list[tuple[str, np.ndarray]]) -> str:
  """SHA-256 over every array's path, dtype, shape and bytes, in tree order (integers as
  int64: a restore may widen the int32 step)."""
  h = hashlib.sha256()
  for path, a in leaves:
    a = np.ascontiguousarray(a.astype(np.int64) if a.dtype.kind in "iu" else a)
    h.update(f"{path}\0{a.dtype.str}\0{a.shape}\0".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def check_finite(state: Any, leaves: list[tuple[str, np.ndarray]] | None = None) -> None:
  """Raises TrainingDivergedError if any value of the state is NaN/inf or the parameters'
  global norm exceeds MAX_PARAM_NORM."""
  leaves = _host_leaves(state) if leaves is None else leaves
  sq = 0.0
  for path, a in leaves:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      raise TrainingDivergedError(
          f"The state at step {int(_host(state.step))} holds non-finite values in {path}; it "
          f"was not saved.")
    if path.startswith("['params']"):
      sq += float(np.sum(np.square(a, dtype=np.float64)))
  norm = math.sqrt(sq)
  if norm > MAX_PARAM_NORM:
    raise TrainingDivergedError(
        f"The parameters at step {int(_host(state.step))} have exploded (global norm "
        f"{norm:.3g} > {MAX_PARAM_NORM:g}); the state was not saved.")


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  # The handlers are named so that a new manager can read the items' metadata.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a state tree or of Orbax's tree of ArrayMetadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return {jax.tree_util.keystr(p): tuple(np.shape(leaf)) for p, leaf in flat}


def _check_index(mngr: ocp.CheckpointManager, step: int) -> None:
  """Reads the OCDBT index of the checkpoint's arrays (its ``manifest.ocdbt`` and the B-tree
  under ``d/``) in one call; raises ValueError if it is missing, torn or empty.

  Orbax reads every array concurrently and, when the index itself is bad, stops at the first
  error while tensorstore's other reads still complete: each then prints an "Event loop is
  closed" traceback (about 30 for a small model). Reading the index once first turns that
  case into the one warning of ``Checkpointer.restore``."""
  state_dir = os.path.join(str(mngr.directory), str(step), "state")
  names = os.listdir(state_dir) if os.path.isdir(state_dir) else []
  if "manifest.ocdbt" not in names and not any(n.startswith("ocdbt.process_") for n in names):
    return  # not an OCDBT checkpoint: Orbax reads it file by file
  keys = ts.KvStore.open({"driver": "ocdbt",
                          "base": f"file://{os.path.abspath(state_dir)}/"}).result().list().result()
  if not keys:
    raise ValueError(f"the index of the arrays ({state_dir}/manifest.ocdbt) is missing or empty")


def _read_metadata(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The checkpoint's tree of array metadata; raises if it cannot be read (corruption)."""
  _check_index(mngr, step)
  md = mngr.item_metadata(step)["state"]
  tree = md.tree if hasattr(md, "tree") else md
  if not isinstance(tree, dict):
    raise ValueError(f"the state's array metadata is unreadable ({type(tree).__name__})")
  return tree


def _structure_difference(saved_tree: dict[str, Any], target: Any) -> str | None:
  """How the checkpoint's array metadata differs from ``target`` (params and batch_stats by
  path and shape, the rest by number of arrays), or None if it matches."""
  saved, want = {}, {}
  for field in STATE_FIELDS:
    if field in saved_tree:
      saved.update({f"{field}{k}": v for k, v in _shapes(saved_tree[field]).items()})
    want.update({f"{field}{k}": v for k, v in _shapes(getattr(target, field)).items()})
  named = lambda d: {k: v for k, v in d.items()  # noqa: E731
                     if k.startswith(("params", "batch_stats"))}
  for path in sorted(set(named(saved)) | set(named(want))):
    if saved.get(path) != want.get(path):
      return (f"{path}: {saved.get(path, 'absent')} in the checkpoint, "
              f"{want.get(path, 'absent')} in the model")
  if len(saved) != len(want):
    return f"{len(saved)} arrays in the checkpoint, {len(want)} in the model's state"
  return None


class Checkpointer:
  """Latest-``keep`` and best-by-validation checkpoints of a TrainState."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.keep = keep
    self._latest = _manager(os.path.join(self.workdir, rundir.CHECKPOINTS_DIR), keep)
    self._best = _manager(os.path.join(self.workdir, rundir.BEST_DIR), 1)

  def save(self, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves ``state`` (step, params, batch_stats, opt_state) with JSON ``meta`` and the
    state's digest. Raises TrainingDivergedError (saving nothing) for a non-finite or
    exploded state."""
    leaves = _host_leaves(state)
    check_finite(state, leaves)
    meta = {**meta, DIGEST_KEY: state_digest(leaves)}
    step = int(_host(state.step))
    # The best first: a crash between the two saves then leaves the best saved, and the resume
    # (from the previous latest) trains the epoch again; the other order would lose it.
    managers = ([self._best] if best else []) + [self._latest]
    for mngr in managers:
      if step in mngr.all_steps():
        continue
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)))
      mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for outstanding saves and stops Orbax's threads."""
    for mngr in (self._best, self._latest):
      mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_steps(self) -> list[int]:
    return sorted(self._best.all_steps())

  def _restore(self, mngr: ocp.CheckpointManager, step: int, target: Any):
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_tree(target)), meta=ocp.args.JsonRestore()))
    state, meta = target.replace(**restored["state"]), dict(restored["meta"])
    want = meta.get(DIGEST_KEY)
    if want is not None and state_digest(_host_leaves(state)) != want:
      raise ValueError("the arrays do not match the digest stored with them (corrupt data)")
    return state, meta

  def _move_aside(self, mngr: ocp.CheckpointManager, step: int) -> str:
    src = os.path.join(str(mngr.directory), str(step))
    dst = os.path.join(self.workdir, rundir.CORRUPT_DIR,
                       f"{os.path.basename(str(mngr.directory))}-{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    # The other processes reload once process 0 has moved it.
    sharding.sync_processes(f"checkpoint-moved-aside-{step}")
    mngr.reload()
    if os.path.exists(src):
      raise CheckpointError(f"Could not move the unreadable checkpoint {src} aside to {dst}; "
                            f"check the permissions of {self.workdir}.")
    return dst

  def restore(self, target: Any, *, best: bool = False) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint into ``target``'s structure.

    Returns (state, meta), or None if there is no checkpoint at all. An unreadable
    checkpoint is moved to corrupt/ and the previous one is tried.

    Raises:
      CheckpointError: the newest checkpoint has another structure than ``target`` (nothing
        is moved), or checkpoints existed but none was readable (all moved to corrupt/).
    """
    mngr = self._best if best else self._latest
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      return None
    moved = []
    for step in steps:
      try:  # Only reading the files can fail for a bad checkpoint; the rest are bugs.
        saved_tree = _read_metadata(mngr, step)
      except Exception as e:  # pylint: disable=broad-except
        problem = e
      else:
        difference = _structure_difference(saved_tree, target)
        if difference is not None:
          raise CheckpointError(
              f"The checkpoint at step {step} in {mngr.directory} has another structure than "
              f"this model ({difference}): it was written by another model or another "
              f"version of sovr_jax. Nothing was moved. Use a new --workdir, or restore it "
              f"with the code that wrote it.")
        try:
          return self._restore(mngr, step, target)
        except Exception as e:  # pylint: disable=broad-except
          problem = e
      dst = self._move_aside(mngr, step)
      moved.append(f"step {step} ({type(problem).__name__}: {str(problem)[:200]}) -> {dst}")
      if jax.process_index() == 0:
        print(f"WARNING: checkpoint at step {step} in {mngr.directory} is unreadable "
              f"({type(problem).__name__}: {str(problem)[:200]}); moved it to {dst}"
              + ("; falling back to the previous one." if step != steps[-1] else "."),
              flush=True)
    raise CheckpointError(
        f"No checkpoint in {mngr.directory} could be read; each was moved aside, nothing was "
        f"deleted: {'; '.join(moved)}. To start over, use a new --workdir (or move "
        f"{self.workdir} away).")
