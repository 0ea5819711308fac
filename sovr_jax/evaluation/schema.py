"""The one result schema of an AutoAttack evaluation, whichever engine ran it.

A result (``SCHEMA`` = "sovr_jax.autoattack/2") is a JSON object:

    schema, engine ("reference" | "jax"), version ("standard" | "custom"), attacks [names]
    n, clean_acc, robust_acc, eps, eps_255, norm, seed, batch_size, settings {n_iter, ...}
    per_attack: [{attack, robust_acc (after it), points_attacked, points_broken, time_s,
                  compile_s (JAX; null for the reference)}]
    robust_acc_after {attack: acc}, time_s {attack: s}, total_time_s   (from per_attack)
    complete: false while a run is under way (written after each attack, so a run cut short
            keeps the attacks that finished: robust_acc null, an upper bound in the flags)
    points: {"clean": "1101...", "robust": "1001...", "broken_by": ".0.1..."}
            one character per test point, in order: clean / robust flags as 0/1, and the
            index into ``attacks`` of the attack that broke the point ("." if none broke it:
            robust, or misclassified already clean). Two results on the same points can be
            compared point by point (``decode_points``; McNemar in ``sovr_jax.stats``).
    checks: every returned example inside the eps-ball and [0, 1], finite, and re-evaluated
            on the model (flags_disagree, the borderline rule, unverified_examples)
    model {architecture, width, num_classes, method, checkpoint, step, workdir}, dataset
    points_sha256: SHA-256 of the points attacked (shape, float32 pixels, labels; results
            written before 2026-12-03 lack it)
    upper_bounds (optional): the JAX model's clean / PGD-20 / CW-20 on the same points
    versions, devices, command, host, created                  (``rundir.provenance``)

Robust accuracy is the per-point worst case over the attacks; PGD figures are upper bounds.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from sovr_jax import jsonio, rundir
from sovr_jax.errors import InvalidFileError

SCHEMA = "sovr_jax.autoattack/2"
NOT_BROKEN = "."
#: Keys every result has (``validate``).
REQUIRED = ("schema", "engine", "version", "attacks", "n", "clean_acc", "robust_acc", "eps",
            "norm", "seed", "settings", "per_attack", "robust_acc_after", "time_s", "points",
            "checks", "model", "versions", "command")


def encode_flags(flags: Sequence[bool]) -> str:
  return "".join("1" if f else "0" for f in np.asarray(flags, bool))


def encode_broken_by(broken_by: Sequence[str], attacks: Sequence[str]) -> str:
  if len(attacks) > 10:
    raise ValueError("at most 10 attacks can be encoded per point.")
  index = {a: str(i) for i, a in enumerate(attacks)}
  return "".join(index[a] if a else NOT_BROKEN for a in broken_by)


def decode_points(result: dict[str, Any]) -> dict[str, np.ndarray]:
  """{"clean": bool [n], "robust": bool [n], "broken_by": str [n] ("" if not broken)}."""
  p, attacks = result["points"], result["attacks"]
  return {"clean": np.array([c == "1" for c in p["clean"]], bool),
          "robust": np.array([c == "1" for c in p["robust"]], bool),
          "broken_by": np.array(["" if c == NOT_BROKEN else attacks[int(c)]
                                 for c in p["broken_by"]], dtype=object)}


def build(engine: str, *, version: str, attacks: Sequence[str], clean: np.ndarray,
          robust: np.ndarray, broken_by: Sequence[str], per_attack: list[dict[str, Any]],
          eps: float, norm: str, seed: int, batch_size: int, settings: dict[str, Any],
          checks: dict[str, Any], model: dict[str, Any], dataset: str | None,
          points_sha256: str | None = None, extra: dict[str, Any] | None = None,
          complete: bool = True) -> dict[str, Any]:
  """A result in the schema (provenance of this process added). ``complete=False``: a run
  cut after the attacks in ``per_attack`` (robust_acc is null; the flags are an upper bound,
  the robust accuracy after the last attack that finished)."""
  clean, robust = np.asarray(clean, bool), np.asarray(robust, bool)
  n = int(len(clean))
  if robust.shape != (n,) or len(broken_by) != n or np.any(robust & ~clean):
    raise ValueError("clean, robust and broken_by must describe the same points, and a robust "
                     "point must be correct on clean input.")
  result = {
      "schema": SCHEMA, "engine": engine, "version": version, "attacks": list(attacks),
      "n": n, "clean_acc": float(clean.mean()) if n else 0.0,
      "robust_acc": (float(robust.mean()) if n else 0.0) if complete else None,
      "complete": complete,
      "eps": float(eps), "eps_255": float(eps) * 255, "norm": norm, "seed": int(seed),
      "batch_size": int(batch_size), "settings": dict(settings), "per_attack": per_attack,
      "robust_acc_after": {a["attack"]: a["robust_acc"] for a in per_attack},
      "time_s": {a["attack"]: a["time_s"] for a in per_attack},
      "total_time_s": float(sum(a["time_s"] or 0.0 for a in per_attack)),
      "points": {"clean": encode_flags(clean), "robust": encode_flags(robust),
                 "broken_by": encode_broken_by(broken_by, attacks)},
      "checks": checks, "model": model, "dataset": dataset, "points_sha256": points_sha256,
      **(extra or {}),
      **rundir.provenance("torch", "pyautoattack"),
  }
  validate(result)
  return result


def attack_entry(attack: str, *, robust_acc: float, attacked: int, broken: int,
                 time_s: float | None, compile_s: float | None = None,
                 **extra: Any) -> dict[str, Any]:
  """One ``per_attack`` entry (``robust_acc``: after this attack)."""
  return {"attack": attack, "robust_acc": float(robust_acc),
          "points_attacked": int(attacked), "points_broken": int(broken),
          "time_s": time_s, "compile_s": compile_s, **extra}


def validate(result: dict[str, Any]) -> None:
  missing = [k for k in REQUIRED if k not in result]
  if missing or result.get("schema") != SCHEMA:
    raise ValueError(f"not a {SCHEMA} result (missing {missing}, schema "
                     f"{result.get('schema')!r}).")
  n = result["n"]
  if not all(len(result["points"][k]) == n for k in ("clean", "robust", "broken_by")):
    raise ValueError("the per-point strings must have one character per point.")


def comparable(a: dict[str, Any], b: dict[str, Any]) -> str | None:
  """Why results ``a`` and ``b`` cannot be compared point by point (another n, threat model,
  data set or set of points), or None if they can. Points are known to be the same only where
  both results carry ``points_sha256``; older results are compared on n, eps, norm and
  data set alone."""
  if a["n"] != b["n"]:
    return f"n {a['n']} against {b['n']}"
  if a["norm"] != b["norm"] or abs(float(a["eps"]) - float(b["eps"])) > 1e-9:
    return f"{a['norm']} eps {a['eps']:.6g} against {b['norm']} eps {b['eps']:.6g}"
  if a.get("dataset") and b.get("dataset") and a["dataset"] != b["dataset"]:
    return f"data set {a['dataset']} against {b['dataset']}"
  fa, fb = a.get("points_sha256"), b.get("points_sha256")
  if fa and fb and fa != fb:
    return (f"other points (points_sha256 {fa[:12]} against {fb[:12]}: another data source, "
            f"test order or preprocessing)")
  return None


def summary(result: dict[str, Any]) -> dict[str, Any]:
  """The result without its per-point strings (for tables and the study's JSON)."""
  return {k: v for k, v in result.items() if k != "points"}


def write(path: str, result: dict[str, Any]) -> None:
  validate(result)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  jsonio.write_json_atomic(path, result)


def keep_earlier(path: str) -> str | None:
  """Moves an earlier finished result at ``path`` aside, so that a new evaluation writing there
  never replaces it: to ``<name>.earlier-<its time>.json`` beside it. A result that is not
  finished (``complete: false``: a cut JAX run, which the new run redoes) is left to be
  replaced. Returns the new path, or None if nothing was moved."""
  import json  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    old = None
  if isinstance(old, dict) and old.get("complete") is False:
    return None
  stamp = str(old.get("created", "")) if isinstance(old, dict) else ""
  stamp = "".join(c for c in stamp if c.isalnum())[:15] or str(int(os.path.getmtime(path)))
  stem, ext = os.path.splitext(path)
  dst, i = f"{stem}.earlier-{stamp}{ext}", 1
  while os.path.exists(dst):
    dst, i = f"{stem}.earlier-{stamp}-{i}{ext}", i + 1
  os.replace(path, dst)
  return dst


def read(path: str) -> dict[str, Any]:
  """A result file; a file of another format is a clear error."""
  import json  # pylint: disable=import-outside-toplevel
  with open(path) as f:
    result = json.load(f)
  if not isinstance(result, dict) or result.get("schema") != SCHEMA:
    raise InvalidFileError(f"{path} is not a {SCHEMA} AutoAttack result (written by an older "
                       f"version?); rerun python -m sovr_jax.autoattack_eval to rewrite it.")
  validate(result)
  return result
