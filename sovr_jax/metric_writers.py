"""Where a run's metrics go: W/metrics.jsonl (strict JSON, one line per record) and
TensorBoard summaries in W/tensorboard (scalars per step, and the config as hparams).

    tensorboard --logdir runs/                 # watch every run under runs/

Only process 0 writes (one set of files per run, not one per host). TensorBoard goes through
``tensorboardX`` (pure Python, in requirements.txt); without it the JSONL is still written.
"""

from __future__ import annotations

import numbers
import os
import sys
from typing import Any

import jax

from sovr_jax import jsonio, rundir

_NOT_SCALARS = ("step", "epoch")


def _summary_writer_class():
  """tensorboardX's SummaryWriter (None without tensorboardX), imported without torch.

  ``tensorboardX.writer`` runs ``import torch`` when it is imported, only to accept torch
  tensors as values: 2 s on a CPU, a CUDA torch loaded beside jax on a GPU, in every training
  run. We write floats, so torch is kept out while tensorboardX is imported (where torch is
  not imported yet) and importable again right after.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, as without torch.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  finally:
    if blocked and sys.modules.get("torch", False) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends records to W/metrics.jsonl and their numbers to TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.path = os.path.join(workdir, rundir.METRICS_FILE)
    self._main = jax.process_index() == 0
    self._tb = None
    if self._main and tensorboard:
      SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
      if SummaryWriter is not None:
        self._tb = SummaryWriter(os.path.join(workdir, rundir.TENSORBOARD_DIR))

  def write(self, record: dict[str, Any]) -> None:
    """One record: {"step": int, "epoch": int, name: number, ...}."""
    if not self._main:
      return
    jsonio.append_jsonl(self.path, record)
    if self._tb is not None:
      step = int(record.get("step", 0))
      for k, v in record.items():
        if k not in _NOT_SCALARS and isinstance(v, numbers.Real) and not isinstance(v, bool):
          self._tb.add_scalar(k, float(v), step)
      self._tb.flush()

  def write_hparams(self, config: dict[str, Any], results: dict[str, float]) -> None:
    """The run's config (flattened) beside its final results, for TensorBoard's HParams tab."""
    if self._tb is None:
      return
    flat = {}
    for k, v in _flatten(config).items():
      flat[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    self._tb.add_hparams(flat, {f"hparam/{k}": float(v) for k, v in results.items()},
                         name="hparams")
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
