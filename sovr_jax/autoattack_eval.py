"""AutoAttack on the exported PyTorch model: the robustness figure of a training run.

    python -m sovr_jax.autoattack_eval --workdir runs/sovr                 # standard AutoAttack
    python -m sovr_jax.autoattack_eval --workdir runs/sovr --attacks apgd-ce,apgd-t --n 1000
    python -m sovr_jax.autoattack_eval --export runs/sovr/export --device cuda --jax_pgd

AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020; github.com/fra31/auto-attack, here the ``pyautoattack``
package) runs APGD-CE, APGD-T, FAB-T and Square (``--version standard``) on the first ``--n`` test
examples of the run's data set, each attack on the points that survived the previous ones. The
model attacked is the run's PyTorch export (``sovr_jax.export``; made on the fly in
``W/export`` if missing or stale). The returned adversarial examples are checked (within eps,
inside [0, 1], finite) and re-evaluated on the model; the robust accuracy written is the fraction
of examples that AutoAttack did not break AND whose returned example is still classified
correctly.

Written to ``--out`` (default ``W/autoattack.json``, atomically): clean_acc, robust_acc, the
robust accuracy after each attack and each attack's time, the settings, versions, checks, and
(with ``--jax_pgd``) the JAX model's own clean / PGD-20 / CW-20 accuracies on the same points as
UPPER BOUNDS, with the check robust_acc <= PGD-20 accuracy.

An interrupted evaluation resumes when the same command is run again: pyautoattack saves the
robust points after every batch to ``<out>_state.json``, and ``<out>_progress.json`` records the
settings and each finished attack; the next run attacks only the points still robust with the
attacks not yet finished (see "Resuming" below for why pyautoattack's own restore is not used).
A state left by different settings is refused (``--fresh`` starts over). Adversarial examples
found before an interruption are not kept, so those points are counted from the state file and
reported as ``checks.unverified_examples``. Both files are deleted once the results are written.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import sovr_jax
from sovr_jax import export, jsonio

#: Attacks pyautoattack knows (for --attacks), and its preset versions.
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand")
LOGGER_NAME = "auto-attack"
#: Tolerance of the eps check on returned examples (float32 rounding of x +- eps).
EPS_RTOL, EPS_ATOL = 1e-5, 1e-6
JAX_NOTE = ("jax_pgd20_acc and jax_cw20_acc (the JAX model's own PGD-20 / CW-20, as in "
            "report.json) are UPPER BOUNDS on robust accuracy; robust_acc (AutoAttack) is the "
            "robustness figure.")


def parse_eps(text: str) -> float:
  """A float or a fraction such as ``8/255``."""
  s = str(text).strip()
  try:
    if "/" in s:
      num, den = s.split("/", 1)
      value = float(num) / float(den)
    else:
      value = float(s)
  except (ValueError, ZeroDivisionError) as e:
    raise ValueError(f"Cannot read eps {text!r}; give a number such as 0.0314 or 8/255.") from e
  if not math.isfinite(value):
    raise ValueError(f"eps must be finite, got {text!r}.")
  return value


def check_eps(eps: float, norm: str) -> None:
  """Refuses eps <= 0 and, for Linf, eps > 1 (pixel units instead of [0, 1] units)."""
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps}.")
  if norm == "Linf" and eps > 1:
    raise ValueError(f"eps={eps:g} is larger than the [0, 1] image range (AutoAttack's inputs); "
                     f"did you mean --eps {eps:g}/255 (= {eps / 255:.6f})?")


def parse_attacks(text: str) -> list[str]:
  """'apgd-ce,apgd-t' -> ['apgd-ce', 'apgd-t'], checked against ``ATTACKS``."""
  names = [a.strip().lower() for a in text.split(",") if a.strip()]
  bad = [a for a in names if a not in ATTACKS]
  if not names or bad:
    raise ValueError(f"--attacks {text!r}: unknown or empty attack list ({bad or 'empty'}); "
                     f"valid attacks: {', '.join(ATTACKS)} (comma-separated).")
  if len(set(names)) != len(names):
    raise ValueError(f"--attacks {text!r} names an attack twice.")
  return names


# --------------------------------------------------------------------------------------------
# Resuming: pyautoattack's state file, read by us.
# --------------------------------------------------------------------------------------------
#
# pyautoattack 0.2.0 cannot restore its own state file: ``to_disk`` writes the set of attacks to
# run as the string "{'apgd-ce', ...}" (``json.dump(..., default=str)``) and ``from_disk`` reads
# it back as that string, so ``set(attacks) != state.attacks_to_run`` always holds and
# run_standard_evaluation raises "different set of attacks"; ``_run_attacks`` comes back as a
# list (``add_run_attack`` then fails), and with restored robust flags ``y_adv`` is never
# assigned (UnboundLocalError at the first attacked batch). So every session here is a FRESH
# pyautoattack run with ``state_path`` (saved after every batch): on an interruption we read the
# state file ourselves, merge its robust flags into the flags of the whole evaluation (kept in
# ``<out>_progress.json`` with the per-attack results), and the next session attacks only the
# still-robust points with the attacks not yet finished.


def _as_set(value: Any) -> set[str]:
  if isinstance(value, str):  # pyautoattack 0.2.0's str(set) format
    value = ast.literal_eval(value) if value.strip() not in ("set()", "") else set()
  return set(value or ())


def read_state(path: Path) -> dict[str, Any] | None:
  """The run attacks and robust flags of a state file (either format), or None if absent."""
  if not path.exists():
    return None
  with path.open() as f:
    d = json.load(f)
  flags = d.get("_robust_flags")
  return {"attacks_to_run": _as_set(d.get("_attacks_to_run")),
          "run_attacks": _as_set(d.get("_run_attacks")),
          "robust_flags": None if flags is None else np.asarray(flags, bool),
          "clean_accuracy": float(d.get("_clean_accuracy", float("nan")))}


# --------------------------------------------------------------------------------------------
# Following pyautoattack's log.
# --------------------------------------------------------------------------------------------


class _AutoAttackLog(logging.Handler):
  """Prints pyautoattack's log records with timestamps and records, per attack, its start and end
  times and the exact robust count after it (from the state file, which pyautoattack rewrites
  after every batch, rather than the rounded percentage in the log line)."""

  def __init__(self, state_path: Path, on_attack_done: Callable[[str, int, float], None],
               scope: str = ""):
    super().__init__(level=logging.DEBUG)
    self._state_path = state_path
    self._scope = scope
    self._on_done = on_attack_done
    self._start: dict[str, float] = {}
    self.exhausted = False
    self.warnings: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    try:
      msg = record.getMessage()
      stamp = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
      level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
      print(f"[{stamp}] autoattack{self._scope}: {level}{msg}", flush=True)
      if record.levelno >= logging.WARNING:
        self.warnings.append(msg)
      m = re.match(r"running (\S+)$", msg)
      if m:
        self._start[m.group(1).lower()] = record.created
        return
      m = re.match(r"robust accuracy after (\S+):", msg)
      if m:
        attack = m.group(1).lower()
        count = int(read_state(self._state_path)["robust_flags"].sum())
        self._on_done(attack, count, record.created - self._start.get(attack, record.created))
        return
      if msg.startswith("no robust datapoints left"):
        self.exhausted = True
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


@contextlib.contextmanager
def _capture_log(handler: logging.Handler):
  logger = logging.getLogger(LOGGER_NAME)
  old_level, old_propagate = logger.level, logger.propagate
  logger.setLevel(logging.DEBUG)
  logger.propagate = False
  logger.addHandler(handler)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


# --------------------------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
  print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: str) -> np.ndarray:
  out = []
  with torch.no_grad():
    for i in range(0, len(x), batch_size):
      out.append(model(x[i:i + batch_size].to(device)).argmax(1).cpu())
  return torch.cat(out).numpy()


def _resolve_export(args, workdir: str | None) -> tuple[str, dict[str, Any]]:
  """The model.json to attack: --export, or W/export (re-exported if missing or stale)."""
  if args.export:
    return export.read_export_info(args.export)
  export_dir = os.path.join(workdir, "export")
  json_path = os.path.join(export_dir, export.INFO_FILE)
  steps = export.checkpoint_steps(workdir, args.checkpoint)
  reason = None
  if not os.path.exists(json_path):
    reason = f"no export in {export_dir}"
  else:
    try:
      _, info = export.read_export_info(json_path)
      src = info.get("source", {})
      if src.get("checkpoint") != args.checkpoint or not steps or src.get("step") != steps[0]:
        reason = (f"the export in {export_dir} is of the {src.get('checkpoint')} checkpoint at "
                  f"step {src.get('step')}, the {args.checkpoint} checkpoint is now at step "
                  f"{steps[0] if steps else None}")
    except ValueError as e:
      reason = str(e)
  if reason is None:
    return export.read_export_info(json_path)
  return None, {"_reason": reason, "_dir": export_dir}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the evaluation for command-line ``argv`` and returns the written results."""
  args = _parser().parse_args(argv)
  argv = list(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to PyTorch

  if args.engine == "jax" and not args.workdir:
    raise ValueError("--engine jax attacks the JAX model itself: give --workdir (a training run).")
  if args.engine != "jax" and args.attack_dtype != "float32":
    raise ValueError("--attack_dtype applies to --engine jax; the reference runs in float32.")
  if not args.workdir and not args.export:
    raise ValueError("Give --workdir (a training run; exported on the fly) or --export (a "
                     "directory written by python -m sovr_jax.export).")
  if args.n < 1 or args.batch_size < 1:
    raise ValueError(f"--n and --batch_size must be >= 1, got {args.n} and {args.batch_size}.")
  if args.threads < 0:
    raise ValueError(f"--threads must be >= 0 (0 = PyTorch's default), got {args.threads}.")
  if args.threads:
    torch.set_num_threads(args.threads)
  attacks = parse_attacks(args.attacks) if args.attacks else None
  if attacks is not None and args.version != "standard":
    raise ValueError("Give either --version or --attacks, not both.")
  device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device.startswith("cuda") and not torch.cuda.is_available():
    raise ValueError(f"--device {device}: CUDA is not available to this PyTorch "
                     f"({torch.__version__}); use --device cpu.")
  workdir = os.path.abspath(args.workdir) if args.workdir else None
  if workdir is not None:
    config = export.read_workdir_config(workdir)  # clear error for a bad workdir
    json_path, info = _resolve_export(args, workdir)
  else:
    json_path, info = export.read_export_info(args.export)
    config = info["config"]

  import ml_collections  # pylint: disable=import-outside-toplevel
  from sovr_jax import experiment  # pylint: disable=import-outside-toplevel

  cfg = ml_collections.ConfigDict(config)
  norm = {"linf": "Linf", "l2": "L2"}.get(cfg.attack.norm)
  if norm is None:
    raise ValueError(f"AutoAttack supports the linf and l2 threat models; the run used "
                     f"{cfg.attack.norm!r}.")
  eps = parse_eps(args.eps) if args.eps is not None else float(cfg.attack.eps)
  check_eps(eps, norm)
  _log(f"Loading the test split of {cfg.data.name} ...")
  ds = experiment.load_data(cfg)
  if args.engine == "jax":
    return _run_jax(args, argv, workdir, cfg, ds, eps, norm, attacks)
  if json_path is None:
    _log(f"Exporting {workdir} ({info['_reason']}) ...")
    json_path, info = export.read_export_info(export.export_workdir(
        workdir, info["_dir"], checkpoint=args.checkpoint, dataset=ds))
  h, w, c = ds.image_shape
  if list(info["input_shape"]) != [c, h, w] or info["num_classes"] != ds.num_classes:
    raise ValueError(f"The export {json_path} expects inputs {info['input_shape']} (CHW) and "
                     f"{info['num_classes']} classes, but {ds.name} has {[c, h, w]} and "
                     f"{ds.num_classes}; it belongs to another run.")
  n = min(args.n, ds.num_test)
  images, labels = ds.test_images[:n], ds.test_labels[:n]
  x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels.astype(np.int64))

  if device.startswith("cuda"):
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
  model = export.load_exported(json_path, map_location=device)
  torch.manual_seed(args.seed)
  clean_pred = _predict(model, x, args.batch_size, device)
  clean_correct = clean_pred == labels

  out = os.path.abspath(args.out or os.path.join(workdir or os.path.dirname(json_path),
                                                 "autoattack.json"))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  base = os.path.splitext(out)[0]
  state_path, progress_path = Path(base + "_state.json"), base + "_progress.json"
  version = "custom" if attacks is not None else args.version
  fingerprint = {"weights_sha256": info.get("weights_sha256"), "export": json_path, "n": n,
                 "eps": eps, "norm": norm, "seed": args.seed, "version": version,
                 "attacks": attacks, "dataset": ds.name,
                 "labels_head": labels[:64].tolist()}
  progress, start_flags = _start_session(state_path, progress_path, fingerprint, n, args.fresh)
  resumed = start_flags is not None

  from pyautoattack import AutoAttack  # pylint: disable=import-outside-toplevel
  import pyautoattack  # pylint: disable=import-outside-toplevel

  aa = AutoAttack(model, attacks=attacks, device=device, eps=eps, norm=norm, seed=args.seed,
                  version=version)
  settings = _standard_settings(aa, ds.num_classes, custom=attacks is not None)
  attack_order = list(aa.attacks_to_run)
  _log(f"AutoAttack ({version}: {', '.join(attack_order)}) on {n} {ds.name} test examples, "
       f"{norm} eps={eps:.6g} ({eps * 255:.4g}/255), seed {args.seed}, batch {args.batch_size}, "
       f"device {device}; model {info['architecture']} (width {info['width']}) from "
       f"{info['source']['path']}; clean accuracy {clean_correct.mean():.2%}.")
  remaining = [a for a in attack_order if a not in progress["attacks"]]
  subset = np.arange(n) if not resumed else np.flatnonzero(start_flags)
  if resumed:
    _log(f"Resuming an interrupted run ({state_path}): finished attacks: "
         f"{', '.join(progress['attacks']) or 'none'}; {len(subset)} of {n} points still "
         f"robust; running {', '.join(remaining) or 'nothing'} on them.")

  def on_attack_done(attack: str, count: int, seconds: float) -> None:
    progress["attacks"][attack] = {"robust_count": count, "time_s": seconds,
                                   "session": progress["sessions"]}
    jsonio.write_json_atomic(progress_path, progress)

  progress.update(subset=subset.tolist(), subset_robust=resumed,
                  sessions=progress.get("sessions", 0) + 1)
  with contextlib.suppress(FileNotFoundError):
    state_path.unlink()  # merged into the progress record by _start_session
  jsonio.write_json_atomic(progress_path, progress)
  handler = _AutoAttackLog(state_path, on_attack_done,
                           f" (on the {len(subset)} points still robust)" if resumed else "")
  x_adv = x.clone()
  flags = np.zeros(n, bool) if resumed else clean_correct.copy()
  if resumed:
    flags[subset] = True
  aa_clean_acc = None
  t0 = time.time()
  if remaining and len(subset):
    aa.attacks_to_run = remaining
    idx = torch.from_numpy(subset)
    with _capture_log(handler):
      session_adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=args.batch_size,
                                                  state_path=state_path)
    x_adv[idx] = session_adv.detach().cpu()
    session = read_state(state_path)
    flags[subset] = session["robust_flags"]
    if not resumed:
      aa_clean_acc = session["clean_accuracy"]
  total_s = time.time() - t0

  # Verify the returned examples and re-evaluate them on the model.
  delta = (x_adv - x).reshape(n, -1)
  dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
  max_dist = float(dist.max())
  within = bool(max_dist <= eps * (1 + EPS_RTOL) + EPS_ATOL)
  in_range = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
  finite = bool(torch.isfinite(x_adv).all())
  if not (within and in_range and finite):
    raise RuntimeError(f"AutoAttack returned invalid examples (max {norm} distance {max_dist:.6g} "
                       f"for eps {eps:.6g}, in [0, 1]: {in_range}, finite: {finite}); no results "
                       f"were written.")
  adv_correct = _predict(model, x_adv, args.batch_size, device) == labels
  attacked = np.zeros(n, bool)
  attacked[subset] = True
  # Points broken in an earlier session: their adversarial examples were not returned.
  earlier = clean_correct & ~attacked
  disagree = int(np.sum((adv_correct != flags) & attacked))
  robust = adv_correct & flags
  robust_acc = float(robust.mean())

  per_attack, robust_after, time_per = [], {}, {}
  for attack in attack_order:
    rec = progress["attacks"].get(attack)
    if rec is not None and rec.get("robust_count") is not None:
      entry = {"attack": attack, "robust_acc": rec["robust_count"] / n, "time_s": rec["time_s"],
               "session": rec.get("session")}
    elif handler.exhausted or not flags.any():
      entry = {"attack": attack, "robust_acc": 0.0, "time_s": 0.0,
               "skipped": "no robust points left"}
    else:
      entry = {"attack": attack, "robust_acc": None, "time_s": None,
               "note": "finished before an interruption; its count was not recorded"}
    per_attack.append(entry)
    robust_after[attack] = entry["robust_acc"]
    time_per[attack] = entry["time_s"]

  results = {
      "clean_acc": float(clean_correct.mean()),
      "robust_acc": robust_acc,
      "robust_acc_after": robust_after,
      "time_s": time_per,
      "attacks_detail": per_attack,
      "total_time_s": total_s,
      "n": n,
      "eps": eps,
      "eps_255": eps * 255,
      "norm": norm,
      "seed": args.seed,
      "batch_size": args.batch_size,
      "device": device,
      "threads": torch.get_num_threads(),
      "device_name": (torch.cuda.get_device_name(torch.device(device))
                      if device.startswith("cuda") else platform.processor() or "cpu"),
      "allow_tf32": bool(args.allow_tf32) if device.startswith("cuda") else None,
      "version": version,
      "attacks": attack_order,
      "attack_settings": settings,
      "dataset": ds.name,
      "model": {"architecture": info["architecture"], "width": info["width"],
                "num_classes": info["num_classes"], "method": info.get("method"),
                "checkpoint": info["source"]["path"], "step": info["source"]["step"]},
      "export": json_path,
      "workdir": workdir,
      "resumed": resumed,
      "sessions": progress["sessions"],
      "checks": {
          "max_perturbation": max_dist,
          "within_eps": within,
          "in_unit_range": in_range,
          "finite": finite,
          "autoattack_clean_acc": aa_clean_acc,
          "autoattack_robust_acc": float(flags.mean()),
          "robust_acc_from_x_adv": float(adv_correct.mean()),
          "flags_disagree": disagree,
          "unverified_examples": int(np.sum(earlier & clean_correct)),
          "autoattack_warnings": handler.warnings,
      },
      "versions": {"torch": torch.__version__, "pyautoattack": pyautoattack.__version__,
                   "sovr_jax": sovr_jax.__version__, "python": platform.python_version(),
                   "numpy": np.__version__},
      "command": "python -m sovr_jax.autoattack_eval " + shlex.join(argv),
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
  }
  if disagree:
    _warn(f"{disagree} of {n} examples: AutoAttack's robust flags disagree with re-evaluating its "
          f"adversarial examples (a nondeterministic model?). robust_acc counts an example as "
          f"robust only if both say so.")
  if aa_clean_acc is not None and not math.isclose(aa_clean_acc, results["clean_acc"]):
    _warn(f"AutoAttack's clean accuracy {aa_clean_acc:.4f} differs from the re-evaluated "
          f"{results['clean_acc']:.4f} (a nondeterministic model?).")
  if results["resumed"]:
    _log(f"Resumed run: {results['checks']['unverified_examples']} examples were broken before "
         f"the interruption and are counted from the state file (not re-verified).")

  if args.jax_pgd:
    results.update(_jax_pgd(workdir or info["source"]["workdir"], info, ds, images, labels, eps,
                            cfg, args))
    results["jax_note"] = JAX_NOTE
    ok = results["robust_acc"] <= results["jax_pgd20_acc"]
    results["checks"]["robust_acc_le_jax_pgd20"] = ok
    if not ok:
      _warn(f"AutoAttack robust accuracy {results['robust_acc']:.4f} is ABOVE the JAX model's "
            f"PGD-20 accuracy {results['jax_pgd20_acc']:.4f} on the same {n} points. AutoAttack "
            f"should be the stronger attack: check the export (model.json export_check), eps, "
            f"and that the attacks ran on the right model.")

  jsonio.write_json_atomic(out, results)
  for p in (state_path, Path(progress_path)):  # finished: the next run starts afresh
    with contextlib.suppress(FileNotFoundError):
      p.unlink()
  def fmt(a):
    acc, secs = robust_after[a], time_per[a]
    return (f"after {a}: {'?' if acc is None else f'{acc:.2%}'} "
            f"({'?' if secs is None else f'{secs:.1f}'} s)")

  _log(f"clean {results['clean_acc']:.2%} | " + " | ".join(fmt(a) for a in attack_order)
       + f" | robust accuracy {robust_acc:.2%} -> {out}")
  if args.jax_pgd:
    _log(f"JAX (upper bounds): clean {results['jax_clean_acc']:.2%}, PGD-20 "
         f"{results['jax_pgd20_acc']:.2%}, CW-20 {results['jax_cw20_acc']:.2%}.")
  return results


def _warn(msg: str) -> None:
  bar = "!" * 78
  print(f"{bar}\nWARNING: {msg}\n{bar}", file=sys.stderr, flush=True)


def _standard_settings(aa, num_classes: int, *, custom: bool) -> dict[str, Any]:
  """Gives a custom attack list the standard version's settings (pyautoattack's 'custom' keeps
  the constructor defaults, e.g. 5 APGD-CE restarts) and caps the target classes at
  num_classes - 1; returns the settings used."""
  targets = max(1, min(9, num_classes - 1))
  if custom:
    if aa.norm in ("Linf", "L2"):
      aa.apgd.n_restarts = 1
    aa.fab.n_restarts = 1
    aa.apgd_targeted.n_restarts = 1
    aa.square.n_queries = 5000
  aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, targets)
  aa.fab.n_target_classes = min(aa.fab.n_target_classes, targets)
  return {"apgd_n_restarts": aa.apgd.n_restarts, "apgd_n_iter": aa.apgd.n_iter,
          "apgd_t_n_restarts": aa.apgd_targeted.n_restarts,
          "apgd_t_n_target_classes": aa.apgd_targeted.n_target_classes,
          "fab_n_restarts": aa.fab.n_restarts, "fab_n_target_classes": aa.fab.n_target_classes,
          "square_n_queries": aa.square.n_queries}


def _start_session(state_path: Path, progress_path: str, fingerprint: dict[str, Any], n: int,
                   fresh: bool) -> tuple[dict[str, Any], np.ndarray | None]:
  """The progress record and robust flags [n] of an interrupted run with the same settings
  (its last session's state file merged in), or a new record and None."""
  if fresh:
    for p in (state_path, Path(progress_path)):
      with contextlib.suppress(FileNotFoundError):
        p.unlink()
  new = {"fingerprint": fingerprint, "attacks": {}, "subset": None, "sessions": 0}
  try:
    with open(progress_path) as f:
      progress = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    progress = None
  if progress is not None and progress.get("fingerprint") != fingerprint:
    if not state_path.exists():
      return new, None  # a stale record without a state: nothing to resume
    old = progress.get("fingerprint") or {}
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    raise ValueError(
        f"{state_path} holds an interrupted AutoAttack run with other settings "
        f"({', '.join(diff)}). Rerun with the same settings to resume it, or pass --fresh (or "
        f"delete {state_path}) to start over.")
  if progress is None:
    if state_path.exists():
      raise ValueError(
          f"{state_path} holds an AutoAttack state without its record {progress_path}, so its "
          f"settings cannot be checked. Pass --fresh (or delete {state_path}) to start over.")
    return new, None
  subset = progress.get("subset")
  if subset is None:
    return new, None
  subset = np.asarray(subset, dtype=np.int64)
  flags = np.zeros(n, bool)
  try:
    state = read_state(state_path)
  except (json.JSONDecodeError, KeyError, ValueError) as e:
    print(f"WARNING: {state_path} is unreadable ({e}); resuming from the last finished attack.",
          flush=True)
    state = None
  if state is not None and state["robust_flags"] is not None:
    if len(state["robust_flags"]) != len(subset):
      raise ValueError(f"{state_path} does not match its record {progress_path}; pass --fresh to "
                       f"start over.")
    flags[subset] = state["robust_flags"]
    for attack in state["run_attacks"] - set(progress["attacks"]):
      progress["attacks"][attack] = {"robust_count": None, "time_s": None}
  elif progress.get("subset_robust"):
    flags[subset] = True  # the session had not changed any flag yet
  else:
    return new, None  # interrupted before the clean evaluation: start over
  return progress, flags


def _jax_pgd(workdir, info, ds, images, labels, eps, cfg, args) -> dict[str, Any]:
  """The JAX model's clean / PGD-20 / CW-20 accuracies on the same points (upper bounds)."""
  from sovr_jax import evaluate, sharding  # pylint: disable=import-outside-toplevel

  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  checkpoint = info["source"]["checkpoint"]
  run = export.restore_run(workdir, checkpoint=checkpoint, dataset=ds)
  if run.step != info["source"]["step"]:
    _warn(f"The {checkpoint} checkpoint of {workdir} is at step {run.step} but the export is of "
          f"step {info['source']['step']}; the JAX numbers are of a different model. Re-export.")
  if cfg.eval.step_size and math.isclose(eps, cfg.attack.eps):
    step_size = float(cfg.eval.step_size)
  else:
    step_size = eps / 4
  mesh = sharding.make_mesh()
  ndev = mesh.devices.size
  bs = min(args.batch_size, len(labels))
  bs = max(ndev, bs - bs % ndev)
  _log(f"JAX PGD-20 / CW-20 (step {step_size:.4g}) on the same {len(labels)} points ...")
  t0 = time.time()
  r = evaluate.Evaluator(run.model, mesh=mesh, eps=eps, step_size=step_size,
                         norm=cfg.attack.norm, pgd_steps=20, cw_steps=20,
                         batch_size=bs)(run.variables, images, labels, seed=args.seed)
  return {"jax_clean_acc": r["clean_acc"], "jax_pgd20_acc": r["pgd_acc"],
          "jax_cw20_acc": r["cw_acc"], "jax_step_size": step_size, "jax_step": run.step,
          "jax_time_s": time.time() - t0}


def _run_jax(args, argv, workdir, cfg, ds, eps, norm, attacks) -> dict[str, Any]:
  """The same evaluation with sovr_jax's own AutoAttack on the JAX model (no export)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from sovr_jax import evaluate, sharding  # pylint: disable=import-outside-toplevel
  from sovr_jax.attacks import autoattack  # pylint: disable=import-outside-toplevel

  if args.version != "standard":
    raise ValueError("--engine jax implements the standard version (or --attacks).")
  run = export.restore_run(workdir, checkpoint=args.checkpoint, dataset=ds)
  n = min(args.n, ds.num_test)
  images, labels = ds.test_images[:n], ds.test_labels[:n]
  mesh = sharding.make_mesh()
  variables = sharding.replicate(run.variables, mesh)
  bs = max(mesh.devices.size, min(args.batch_size, n) - min(args.batch_size, n)
           % mesh.devices.size)

  model_fn = evaluate.model_fn_eval(run.model, variables)
  attack_fn = (None if args.attack_dtype == "float32"
               else evaluate.model_fn_eval(run.model, variables, jnp.dtype(args.attack_dtype)))

  _log(f"JAX AutoAttack ({','.join(attacks or autoattack.STANDARD_ATTACKS)}) on {n} "
       f"{ds.name} test examples, {norm} eps={eps:.6g}, seed {args.seed}, batch {bs}, "
       f"{mesh.devices.size} {jax.devices()[0].platform} device(s); step {run.step}.")
  t0 = time.time()
  result = autoattack.run_standard(
      model_fn, images.astype(np.float32) / 255.0, labels, args.seed, eps=eps,
      norm=norm.lower(), batch_size=bs, attacks=tuple(attacks or autoattack.STANDARD_ATTACKS),
      n_target_classes=min(9, ds.num_classes - 1), mesh=mesh, log=_log,
      attack_model_fn=attack_fn)
  summary = dict(result["summary"])
  summary.update({
      "engine": "jax", "attack_dtype": args.attack_dtype, "total_time_s": time.time() - t0,
      "dataset": ds.name,
      "model": {"architecture": cfg.model.name, "width": cfg.model.width,
                "num_classes": ds.num_classes, "method": cfg.method, "step": run.step,
                "checkpoint": args.checkpoint},
      "workdir": workdir, "command": "python -m sovr_jax.autoattack_eval " + shlex.join(argv),
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
      "versions": {"jax": jax.__version__, "sovr_jax": sovr_jax.__version__,
                   "python": platform.python_version()}})
  if args.jax_pgd:
    info = {"source": {"checkpoint": args.checkpoint, "step": run.step}}
    summary.update(_jax_pgd(workdir, info, ds, images, labels, eps, cfg, args))
    summary["robust_acc_le_jax_pgd20"] = summary["robust_acc"] <= summary["jax_pgd20_acc"]
  out = os.path.abspath(args.out or os.path.join(workdir, "autoattack_jax.json"))
  jsonio.write_json_atomic(out, summary)
  after = " | ".join(f"after {k}: {v:.2%} ({summary['time_s'].get(k, 0.0):.1f} s)"
                     for k, v in summary["robust_acc_after"].items())
  _log(f"clean {summary['clean_acc']:.2%} | {after} | robust accuracy "
       f"{summary['robust_acc']:.2%} -> {out}")
  return summary


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m sovr_jax.autoattack_eval",
      description="AutoAttack (Croce & Hein 2020) on a training run's PyTorch export.")
  p.add_argument("--workdir", help="training run (exported on the fly to WORKDIR/export)")
  p.add_argument("--export", help="an export directory (python -m sovr_jax.export)")
  p.add_argument("--checkpoint", choices=export.CHECKPOINT_KINDS, default="best",
                 help="checkpoint to export with --workdir (default: best)")
  p.add_argument("--n", type=int, default=10000,
                 help="first N test examples (default 10000, or the whole test split)")
  p.add_argument("--batch_size", type=int, default=500)
  p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eps", help="perturbation budget in [0, 1] units, e.g. 0.0314 or 8/255 "
                 "(default: the run's attack.eps)")
  p.add_argument("--version", choices=VERSIONS, default="standard",
                 help="pyautoattack version (default: standard)")
  p.add_argument("--attacks", help=f"custom comma-separated subset of {', '.join(ATTACKS)} "
                 "(run with the standard version's settings)")
  p.add_argument("--engine", choices=("reference", "jax"), default="reference",
                 help="reference: pyautoattack on the PyTorch export (default); jax: "
                 "sovr_jax.attacks.autoattack on the JAX model (default out: "
                 "WORKDIR/autoattack_jax.json)")
  p.add_argument("--attack_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="--engine jax: compute dtype of the network the attacks run on (every "
                 "decision is made on the float32 model)")
  p.add_argument("--jax_pgd", action="store_true",
                 help="also run the JAX model's PGD-20 and CW-20 on the same points")
  p.add_argument("--out", help="results JSON (default: WORKDIR/autoattack.json)")
  p.add_argument("--fresh", action="store_true",
                 help="discard an interrupted run's state instead of resuming it")
  p.add_argument("--threads", type=int, default=0,
                 help="PyTorch CPU threads (0 = PyTorch's default; use fewer than the free cores "
                 "on a shared machine: oversubscribed OpenMP threads slow attacks down a lot)")
  p.add_argument("--allow_tf32", action="store_true",
                 help="allow TF32 convolutions/matmuls on CUDA (faster, not float32-exact)")
  return p


def main(argv: Sequence[str] | None = None) -> None:
  try:
    run(argv)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
