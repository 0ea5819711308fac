"""The reference engine: pyautoattack (fra31/auto-attack, Croce & Hein, ICML 2020) on the
target's PyTorch model, attack by attack, resumable, every returned example verified.

Each attack is one ``AutoAttack(version="custom", attacks=[a]).run_standard_evaluation`` on
the points still robust after the previous ones, with the standard version's settings
(``settings.Settings``). That is what one standard run does (the same batches; each attack
reseeds torch with the seed), and it gives each attack's time and broken points directly.

Resuming: after every attack, ``<out>_progress.json`` records the settings' fingerprint and
the per-point flags; during an attack pyautoattack saves its robust flags after every batch
to ``<out>_state.json``. A run killed at any time (SIGKILL included) and started again with
the same settings goes on from the last finished attack, counting the points the interrupted
attack had already broken (their examples are lost: ``checks.unverified_examples``) and
running that attack again on the points still robust. pyautoattack 0.2.0 cannot restore its
own state file (its attack set is written as a string and read back as one), so the state
is read here and a fresh pyautoattack session runs each time. Other settings are refused
(``--fresh`` starts over).

Verification: every returned example is checked (inside the eps-ball and [0, 1], finite) and
re-evaluated on the model; a point counts as robust only if AutoAttack did not break it and
its example is still classified correctly (disagreements are counted; the borderline rule of
``ensemble.flag_checks`` tells rounding-level ones apart).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sovr_jax import jsonio, optional
from sovr_jax.attacks.autoattack import ensemble
from sovr_jax.errors import ConfigError
from sovr_jax.evaluation import schema
from sovr_jax.evaluation.settings import REFERENCE_NORMS, Settings
from sovr_jax.evaluation.targets import Target

LOGGER_NAME = "auto-attack"
#: pyautoattack's other versions, run with its own settings (the reference engine only).
PRESETS = ("plus", "rand")
#: Points on which the twin is checked against the JAX model, and the largest relative logit
#: difference accepted (float32 on both sides; as sovr_jax.export's check).
TWIN_CHECK_POINTS, TWIN_RTOL = 64, 1e-3


def preset_attacks(version: str) -> tuple[str, ...]:
  """The attacks pyautoattack's ``version`` runs, in its order (needs pyautoattack)."""
  import_torch()
  from pyautoattack import AutoAttack  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  return tuple(AutoAttack(torch.nn.Identity(), version=version, device="cpu").attacks_to_run)


def import_torch():
  """torch (with pyautoattack importable), or a clear error that says how to install them."""
  torch, _ = optional.require("torch", "pyautoattack",
                              purpose="The reference AutoAttack (--engine reference or both)")
  return torch


def resume_paths(out: str) -> tuple[Path, Path]:
  """(pyautoattack's state file, our progress file) of a result path."""
  base = os.path.splitext(os.path.abspath(out))[0]
  return Path(base + "_state.json"), Path(base + "_progress.json")


def clear_resume_files(out: str) -> None:
  for p in resume_paths(out):
    with contextlib.suppress(FileNotFoundError):
      p.unlink()


class _Log(logging.Handler):
  """Prints pyautoattack's records with timestamps; keeps its warnings."""

  def __init__(self, log: Callable[[str], None], scope: str):
    super().__init__(level=logging.DEBUG)
    self._log, self._scope, self.warnings = log, scope, []

  def emit(self, record: logging.LogRecord) -> None:
    msg = record.getMessage()
    if record.levelno >= logging.WARNING:
      self.warnings.append(msg)
    self._log(f"autoattack{self._scope}: {msg}")


@contextlib.contextmanager
def _capture(handler: logging.Handler):
  logger = logging.getLogger(LOGGER_NAME)
  old = logger.level, logger.propagate
  logger.setLevel(logging.DEBUG)
  logger.propagate = False
  logger.addHandler(handler)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def configure(aa, settings: Settings) -> None:
  """Gives a pyautoattack ``AutoAttack`` these settings (its 'custom' version keeps the
  constructor defaults, e.g. 5 APGD-CE restarts)."""
  aa.apgd.n_restarts = settings.n_restarts
  aa.fab.n_restarts = settings.n_restarts
  aa.apgd_targeted.n_restarts = 1
  aa.apgd_targeted.n_target_classes = settings.n_target_classes
  aa.fab.n_target_classes = settings.n_target_classes
  aa.square.n_queries = settings.n_queries
  aa.fab.n_iter = settings.n_iter
  for att in (aa.apgd, aa.apgd_targeted):  # its checkpoints are set in __init__ from n_iter
    n = settings.n_iter
    att.n_iter = att.n_iter_orig = n
    att.n_iter_2, att.n_iter_min = max(int(0.22 * n), 1), max(int(0.06 * n), 1)
    att.size_decr = max(int(0.03 * n), 1)


def _read_state(path: Path) -> np.ndarray | None:
  """The robust flags pyautoattack saved for the attack in progress, or None."""
  try:
    with path.open() as f:
      flags = json.load(f).get("_robust_flags")
  except (FileNotFoundError, ValueError):
    return None
  return None if flags is None else np.asarray(flags, bool)


def _start(progress_path: Path, state_path: Path, fingerprint: dict[str, Any], fresh: bool,
           log: Callable[[str], None]) -> dict[str, Any] | None:
  """The progress record of an interrupted run with these settings, or None."""
  if fresh:
    for p in (state_path, progress_path):
      with contextlib.suppress(FileNotFoundError):
        p.unlink()
  try:
    with progress_path.open() as f:
      progress = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:
    log(f"WARNING: {progress_path} is unreadable; starting over.")
    return None
  if progress.get("fingerprint") != fingerprint:
    old = progress.get("fingerprint") or {}
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    raise ConfigError(
        f"{progress_path} holds an interrupted AutoAttack run with other settings "
        f"({', '.join(diff)}). Rerun with the same settings to resume it, or pass --fresh (or "
        f"delete {progress_path}) to start over.")
  return progress


def run(target: Target, *, attacks: Sequence[str], seed: int, batch_size: int, device: str,
        settings: Settings, version: str, out: str, fresh: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """The standard (or a custom) AutoAttack on ``target.make_torch(device)`` with pyautoattack.
  Resumes an interrupted run of the same settings recorded next to ``out``; the caller
  writes the result to ``out`` and then calls ``clear_resume_files(out)``."""
  torch = import_torch()
  from pyautoattack import AutoAttack  # pylint: disable=import-outside-toplevel
  if target.make_torch is None:
    raise ValueError("This target has no PyTorch model for the reference engine.")
  model = target.make_torch(device)
  n, s = target.n, settings.for_classes(target.num_classes)
  x = torch.from_numpy(np.ascontiguousarray(target.x.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(target.y.astype(np.int64))
  logits = _logits(model, x, batch_size, device)
  clean = logits.argmax(1) == target.y
  twin = _twin_check(target, logits)
  state_path, progress_path = resume_paths(out)
  fingerprint = {"n": n, "eps": target.eps, "norm": target.norm, "seed": seed,
                 "attacks": list(attacks), "settings": vars(s), "model": target.info,
                 "labels": schema.encode_flags(target.y % 2), "dataset": target.dataset,
                 "points_sha256": target.points_sha256}
  progress = _start(progress_path, state_path, fingerprint, fresh, log)
  resumed = progress is not None
  if progress is None:
    progress = {"fingerprint": fingerprint, "robust": schema.encode_flags(clean),
                "broken_by": ["" for _ in range(n)], "finished": {}, "current": None,
                "subset": None, "sessions": 0}
  robust = np.array([c == "1" for c in progress["robust"]], bool)
  broken_by = list(progress["broken_by"])
  unverified = np.array([bool(b) for b in broken_by], bool)  # broken in earlier sessions
  current, subset = progress.get("current"), progress.get("subset")
  partial = _read_state(state_path) if current else None
  if partial is not None and subset is not None and len(partial) == len(subset):
    lost = np.asarray(subset)[~partial]
    robust[lost], unverified[lost] = False, True
    for i in lost:
      broken_by[i] = current
    log(f"Resuming: {len(lost)} points broken by {current} before the interruption; "
        f"running it again on the {int(robust.sum())} points still robust.")
  elif resumed:
    log(f"Resuming after {', '.join(progress['finished']) or 'no finished attack'}.")
  progress["sessions"] += 1
  x_adv = x.clone()
  warnings: list[str] = []
  for attack in attacks:
    if attack in progress["finished"]:
      continue
    idx = np.flatnonzero(robust)
    t0 = time.time()
    broken = np.zeros(0, np.int64)
    if len(idx):
      progress.update(current=attack, subset=idx.tolist(),
                      robust=schema.encode_flags(robust), broken_by=broken_by)
      jsonio.write_json_atomic(str(progress_path), progress)
      with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
      preset = version in PRESETS  # pyautoattack's own settings for 'plus' and 'rand'
      aa = AutoAttack(model, attacks=None if preset else [attack], device=device,
                      eps=target.eps, norm=REFERENCE_NORMS[target.norm], seed=seed,
                      version=version if preset else "custom")
      if preset:
        aa.attacks_to_run = [attack]
      else:
        configure(aa, s)
      handler = _Log(log, f" ({attack}, {len(idx)} points)")
      sel = torch.from_numpy(idx)
      with _capture(handler):
        adv, _ = aa.run_standard_evaluation(x[sel], y[sel], batch_size=batch_size,
                                            state_path=state_path)
      warnings += handler.warnings
      flags = _read_state(state_path)
      hit = ~flags if flags is not None else np.zeros(len(idx), bool)
      broken = idx[hit]
      x_adv[torch.from_numpy(broken)] = adv.detach().cpu()[torch.from_numpy(np.flatnonzero(hit))]
      robust[broken] = False
      for i in broken:
        broken_by[i] = attack
    progress["finished"][attack] = schema.attack_entry(
        attack, robust_acc=robust.mean(), attacked=len(idx),
        broken=int(np.sum(np.asarray(broken_by, dtype=object) == attack)),
        time_s=time.time() - t0, session=progress["sessions"])
    progress.update(current=None, subset=None, robust=schema.encode_flags(robust),
                    broken_by=broken_by)
    jsonio.write_json_atomic(str(progress_path), progress)
    with contextlib.suppress(FileNotFoundError):
      state_path.unlink()
    log(f"reference: after {attack}: robust accuracy {robust.mean():.2%} "
        f"({progress['finished'][attack]['time_s']:.1f} s)")

  # Verify every example found in this session, re-evaluated on the model.
  x_adv_np = x_adv.permute(0, 2, 3, 1).numpy()
  adv_logits = _logits(model, x_adv, batch_size, device)
  checks = ensemble.example_checks(target.x, x_adv_np, target.eps, target.norm)
  verified = ~unverified
  checks.update(ensemble.flag_checks(robust[verified], (~robust & clean)[verified],
                                     adv_logits[verified], target.y[verified]))
  checks.update(twin, unverified_examples=int(np.sum(unverified & ~robust)),
                autoattack_warnings=warnings, resumed=resumed,
                sessions=progress["sessions"])
  if not (checks["within_eps"] and checks["in_unit_range"] and checks["finite"]):
    raise RuntimeError(f"AutoAttack returned invalid examples ({checks}); no result written.")
  final = robust & (adv_logits.argmax(1) == target.y)  # differs only for a random model
  return schema.build(
      "reference", version=version, attacks=attacks, clean=clean, robust=final,
      broken_by=broken_by,
      per_attack=[progress["finished"][a] for a in attacks], eps=target.eps,
      norm=target.norm, seed=seed, batch_size=batch_size,
      settings={**({"preset": f"pyautoattack version={version!r}"} if version in PRESETS else
                   {"n_iter": s.n_iter, "n_queries": s.n_queries,
                    "n_target_classes": s.n_target_classes, "n_restarts": s.n_restarts}),
                "device": device, "threads": torch.get_num_threads(),
                "allow_tf32": bool(torch.backends.cudnn.allow_tf32)
                if device.startswith("cuda") else None},
      checks=checks, model=target.info, dataset=target.dataset,
      points_sha256=target.points_sha256,
      extra={"device_name": (torch.cuda.get_device_name(torch.device(device))
                             if device.startswith("cuda") else "cpu"),
             "finished": datetime.datetime.now().isoformat(timespec="seconds")})


def _logits(model, x, batch_size: int, device: str) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  out = []
  with torch.no_grad():
    for i in range(0, len(x), batch_size):
      out.append(model(x[i:i + batch_size].to(device)).float().cpu())
  return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def _twin_check(target: Target, torch_logits: np.ndarray) -> dict[str, Any]:
  """The PyTorch twin against the JAX model on the first points (the export's check): max
  |logit difference| / max |logit|, and label agreement. A disagreement is a bug."""
  if target.model_fn is None:
    return {}
  import jax  # pylint: disable=import-outside-toplevel
  k = min(TWIN_CHECK_POINTS, target.n)
  with jax.default_matmul_precision("float32"):
    jax_logits = np.asarray(target.model_fn(target.x[:k]), np.float32)
  diff = float(np.abs(jax_logits - torch_logits[:k]).max()) / max(
      float(np.abs(jax_logits).max()), 1e-12)
  if diff > TWIN_RTOL:
    raise RuntimeError(f"The PyTorch twin disagrees with the JAX model (max relative logit "
                       f"difference {diff:.2e} > {TWIN_RTOL:g}); this is a bug, please report "
                       f"it. Nothing was attacked.")
  return {"twin_max_rel_logit_diff": diff,
          "twin_label_agreement": float(np.mean(jax_logits.argmax(1)
                                                == torch_logits[:k].argmax(1)))}
