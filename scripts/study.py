"""The reproduction study in one command: train every run, attack it, collect one JSON.

    python -m scripts.study --scale gpu --workdir runs/study --out results/study_gpu.json
    python -m scripts.study --scale tiny --workdir /tmp/study --out /tmp/study.json  # CPU smoke

Stages (each skips what an earlier call finished, so rerunning the command resumes):
  1. train    ``python -m sovr_jax.main --config configs/study.py:METHOD,SCALE`` per run, up to
              ``--parallel`` at a time (compilation overlaps the other runs' steps), a log per
              run in WORKDIR/NAME.log. Runs: ``--runs`` (methods) and ``--sweep`` (SOVR's
              ovr_fraction values besides the config's 0.4, named sovr_rho0.2, ...).
  2. attack   ``--reference`` runs: ``scripts/compare_autoattack.py`` (the JAX AutoAttack and
              pyautoattack on the PyTorch export, side by side, on the same first ``--n`` test
              points) -> NAME/compare.json; every other run: ``--aa_engine``'s AutoAttack
              alone (``python -m sovr_jax.autoattack_eval``), jax (default) ->
              NAME/autoattack_jax.json or reference (pyautoattack on the export, e.g. where the
              JAX one is slower: on a CPU) -> NAME/autoattack.json. ``--attacks`` picks a
              subset (default: the standard four).
  3. collect  one JSON (``--out``): per run its method and extra flags, per-epoch training
              and validation curves, test clean / PGD-20 / CW-20 (upper bounds), the raw
              adversarial margins of 2,000 training examples, and the AutoAttack results;
              ``scripts/plot_study.py`` draws the figures from it.
A run that fails or times out is recorded with its error; the others go on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import study as study_config  # noqa: E402  pylint: disable=wrong-import-position
from sovr_jax import jsonio  # noqa: E402  pylint: disable=wrong-import-position

METHODS = ("pgd_at", "sovr", "mail_at", "gairat", "trades", "mart", "ovr", "standard")
DEFAULT_RUNS = "pgd_at,sovr,mail_at,gairat"
#: What ``python -m sovr_jax.autoattack_eval --engine E`` writes, per engine.
AA_FILES = {"jax": "autoattack_jax.json", "reference": "autoattack.json"}
#: Epoch-line fields of metrics.jsonl kept in the collected curves.
CURVE_FIELDS = ("loss", "adv_acc", "clean_acc", "margin", "switched", "weight", "lr",
                "val_clean_acc", "val_pgd_acc", "images_per_s", "epoch_time_s")


def run_specs(runs: str, sweep: str) -> dict[str, tuple[str, list[str]]]:
  """{name: (method, extra main.py flags)} for ``--runs`` and ``--sweep``."""
  specs: dict[str, tuple[str, list[str]]] = {}
  for m in filter(None, (s.strip() for s in runs.split(","))):
    if m not in METHODS:
      raise ValueError(f"Unknown method {m!r} in --runs; valid: {METHODS}.")
    specs[m] = (m, [])
  for r in filter(None, (s.strip() for s in sweep.split(","))):
    rho = float(r)
    if not 0.0 < rho <= 1.0:
      raise ValueError(f"--sweep values are SOVR ovr_fraction values in (0, 1], got {r!r}.")
    specs[f"sovr_rho{rho:g}"] = ("sovr", [f"--config.sovr.ovr_fraction={rho:g}"])
  if not specs:
    raise ValueError("Nothing to run: give --runs and/or --sweep.")
  return specs


def _run(cmd: list[str], log_path: str, timeout: float) -> dict[str, Any]:
  """Runs ``cmd`` (output appended to ``log_path``); {'ok', 'seconds', 'error'}."""
  t0 = time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(cmd)}   # {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    log.flush()
    try:
      rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                          timeout=timeout, check=False).returncode
      error = None if rc == 0 else f"exit status {rc} (see {log_path})"
    except subprocess.TimeoutExpired:
      error = f"timed out after {timeout:.0f} s (see {log_path}); rerun to resume"
  return {"ok": error is None, "seconds": time.time() - t0, "error": error}


def train_stage(specs, args) -> dict[str, dict[str, Any]]:
  """Trains the runs without a report.json, ``--parallel`` at a time."""
  todo = {n: s for n, s in specs.items()
          if not os.path.exists(os.path.join(args.workdir, n, "report.json"))}
  if todo:  # decode (and cache) the images once, not once per parallel run
    from sovr_jax import data  # pylint: disable=import-outside-toplevel
    d = study_config.get_config(f"sovr,{args.scale}").data
    data.load_dataset(d.name, source=d.source, path=args.data or d.path,
                      cache_dir=args.cache_dir or d.cache_dir, val_size=d.val_size)

  def one(name):
    method, extra = specs[name]
    cmd = [sys.executable, "-m", "sovr_jax.main",
           f"--config={os.path.join(REPO, 'configs', 'study.py')}:{method},{args.scale}",
           f"--workdir={os.path.join(args.workdir, name)}", *extra]
    if args.data:
      cmd.append(f"--config.data.path={args.data}")
    if args.cache_dir:
      cmd.append(f"--config.data.cache_dir={args.cache_dir}")
    print(f"[study] train {name}: {' '.join(cmd[2:])}", flush=True)
    r = _run(cmd, os.path.join(args.workdir, f"{name}.log"), args.train_timeout)
    print(f"[study] train {name}: {'done' if r['ok'] else r['error']} in {r['seconds']:.0f} s",
          flush=True)
    return name, r

  with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
    return dict(pool.map(one, todo))


def attack_stage(specs, args) -> dict[str, dict[str, Any]]:
  """AutoAttack for every trained run: side by side with the reference, or JAX alone."""
  reference = set(filter(None, args.reference.split(",")))
  status = {}
  for name in specs:
    wd = os.path.join(args.workdir, name)
    if not os.path.exists(os.path.join(wd, "report.json")):
      continue
    common = [f"--n={args.n}", f"--batch_size={args.aa_batch_size}", f"--seed={args.seed}"]
    if args.attacks:
      common.append(f"--attacks={args.attacks}")
    if name in reference:
      out = os.path.join(wd, "compare.json")
      cmd = [sys.executable, os.path.join(REPO, "scripts", "compare_autoattack.py"),
             f"--workdir={wd}", f"--out={out}", *common]
    else:
      out = os.path.join(wd, AA_FILES[args.aa_engine])
      cmd = [sys.executable, "-m", "sovr_jax.autoattack_eval", f"--engine={args.aa_engine}",
             f"--workdir={wd}", f"--out={out}", *common]
    if args.device and (name in reference or args.aa_engine == "reference"):
      cmd.append(f"--device={args.device}")
    if args.threads:
      cmd.append(f"--threads={args.threads}")
    if os.path.exists(out):
      continue
    print(f"[study] AutoAttack {name} -> {out}", flush=True)
    status[name] = _run(cmd, os.path.join(args.workdir, f"{name}.log"), args.aa_timeout)
    print(f"[study] AutoAttack {name}: "
          f"{'done' if status[name]['ok'] else status[name]['error']} in "
          f"{status[name]['seconds']:.0f} s", flush=True)
  return status


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _curves(path: str) -> list[dict[str, Any]]:
  """One row per epoch: the epoch's training means and its validation line, merged."""
  rows: dict[int, dict[str, Any]] = {}
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      rec = json.loads(line)
      row = rows.setdefault(int(rec["epoch"]), {"epoch": int(rec["epoch"])})
      if "val_pgd_acc" in rec or "epoch_time_s" in rec:
        row.update({k: rec[k] for k in CURVE_FIELDS if k in rec})
      else:  # a log-interval line: accumulate the epoch's mean
        n = row.get("_n", 0)
        for k in CURVE_FIELDS:
          if k in rec and not k.startswith("val_"):
            row[k] = (row.get(k, 0.0) * n + rec[k]) / (n + 1)
        row["_n"] = n + 1
  for row in rows.values():
    row.pop("_n", None)
  return [rows[e] for e in sorted(rows)]


def _aa_summary(s: dict[str, Any] | None) -> dict[str, Any] | None:
  if s is None:
    return None
  keep = ("clean_acc", "robust_acc", "robust_acc_after", "time_s", "compile_s", "n", "eps",
          "seed", "attacks", "checks", "total_time_s", "engine", "batch_size")
  return {k: s[k] for k in keep if k in s}


def collect(specs, args, status) -> dict[str, Any]:
  """The study's JSON: every run's curves, test figures, margins and AutoAttack results."""
  base = study_config.get_config(f"sovr,{args.scale}").to_dict()
  runs = {}
  for name, (method, extra) in specs.items():
    wd = os.path.join(args.workdir, name)
    entry: dict[str, Any] = {"method": method, "flags": extra,
                             "status": status.get(name)}
    if os.path.exists(os.path.join(wd, "report.json")):
      rep = _read_json(os.path.join(wd, "report.json"))
      cfg = rep.get("config", {})
      rho = cfg.get("sovr", {}).get("ovr_fraction") if method == "sovr" else None
      entry.update({"ovr_fraction": rho,
                    "test": rep["test"], "timings": rep.get("timings"),
                    "margins_summary": {k: v for k, v in rep["margins"].items()
                                        if k != "histogram"},
                    "devices": rep.get("devices"), "versions": rep.get("versions")})
      entry["curves"] = _curves(os.path.join(wd, "metrics.jsonl"))
      if os.path.exists(os.path.join(wd, "margins.json")):
        entry["margins"] = _read_json(os.path.join(wd, "margins.json"))
    if os.path.exists(os.path.join(wd, "compare.json")):
      cmp_ = _read_json(os.path.join(wd, "compare.json"))
      entry["autoattack"] = {"jax": _aa_summary(cmp_.get("jax")),
                             "reference": _aa_summary(cmp_.get("reference")),
                             "rows": cmp_.get("rows"),
                             "robust_flag_agreement": cmp_.get("robust_flag_agreement"),
                             "platform": cmp_.get("platform")}
    else:
      aa = {engine: _aa_summary(_read_json(os.path.join(wd, f)))
            for engine, f in AA_FILES.items() if os.path.exists(os.path.join(wd, f))}
      if aa:
        entry["autoattack"] = aa
    runs[name] = entry
  return {"study": "SOVR reproduction, CIFAR-10 (JPEG copy), PreActResNet-18",
          "scale": args.scale, "base_config": base, "runs": runs,
          "autoattack_points": args.n,
          "note": "PGD-20 and CW-20 accuracies are upper bounds; AutoAttack is the robustness "
                  "figure ('reference' = pyautoattack on the PyTorch export, 'jax' = "
                  "sovr_jax.attacks.autoattack).",
          "command": " ".join(sys.argv),
          "created": datetime.datetime.now().isoformat(timespec="seconds")}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scale", default="gpu", choices=study_config.SCALES,
                 help="configs/study.py scale")
  p.add_argument("--workdir", required=True, help="one run per sub-folder")
  p.add_argument("--out", required=True, help="the collected JSON")
  p.add_argument("--runs", default=DEFAULT_RUNS, help=f"methods, from {METHODS}")
  p.add_argument("--sweep", default="", help="extra SOVR ovr_fraction values, e.g. 0.2,0.6,0.8")
  p.add_argument("--data", default="", help="CIFAR-10 JPEG folder or tarball "
                 "(default: the config's ../shared/data/cifar10-jpeg.tar.gz)")
  p.add_argument("--cache_dir", default="", help="decoded-image cache (default: the config's)")
  p.add_argument("--parallel", type=int, default=1, help="training runs at a time")
  p.add_argument("--stages", default="train,attack,collect")
  p.add_argument("--reference", default="sovr",
                 help="runs also attacked by pyautoattack, side by side (comma-separated)")
  p.add_argument("--attacks", default="", help="AutoAttack subset (default: standard four)")
  p.add_argument("--n", type=int, default=1000, help="AutoAttack test points (the first n)")
  p.add_argument("--aa_batch_size", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0, help="AutoAttack seed")
  p.add_argument("--aa_engine", default="jax", choices=tuple(AA_FILES),
                 help="AutoAttack of the runs not in --reference")
  p.add_argument("--device", default="", help="torch device of the reference (default: auto)")
  p.add_argument("--threads", type=int, default=0,
                 help="PyTorch CPU threads of the AutoAttack runs (0 = PyTorch's default)")
  p.add_argument("--train_timeout", type=float, default=3600.0, help="seconds per run")
  p.add_argument("--aa_timeout", type=float, default=3600.0, help="seconds per AutoAttack")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  stages = set(filter(None, args.stages.split(",")))
  unknown = stages - {"train", "attack", "collect"}
  if unknown:
    raise ValueError(f"Unknown stages {sorted(unknown)}; valid: train, attack, collect.")
  specs = run_specs(args.runs, args.sweep)
  args.workdir = os.path.abspath(args.workdir)
  if args.data:
    args.data = os.path.abspath(args.data)
  if args.cache_dir:
    args.cache_dir = os.path.abspath(args.cache_dir)
  os.makedirs(args.workdir, exist_ok=True)
  status: dict[str, Any] = {}
  if "train" in stages:
    for name, r in train_stage(specs, args).items():
      status[name] = {"train": r}
  if "attack" in stages:
    for name, r in attack_stage(specs, args).items():
      status.setdefault(name, {})["autoattack"] = r
  result = None
  if "collect" in stages:
    result = collect(specs, args, status)
    jsonio.write_json_atomic(args.out, result)
    print(f"[study] wrote {args.out}", flush=True)
  return result or {}


if __name__ == "__main__":
  main()
