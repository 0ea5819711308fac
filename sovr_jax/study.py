"""The reproduction study in one command: train every cell, attack it, collect one JSON.

    python -m scripts.study --scale full --runs pgd_at,sovr --seeds 0,1,2 --workdir runs/study \
        --out /tmp/study.json --into results/study_full.json     # a batch of GPU cells
    python -m scripts.study --scale tiny --workdir /tmp/study --out /tmp/study.json  # CPU smoke

(``scripts/study.py`` is this module's entry point.) It runs in a checkout: ``--config``
(default ``configs/study.py``, a path from the working directory, read as a file the way
``python -m sovr_jax.main --config`` reads it) gives the schedule of each ``--scale``.

A cell is a (run, seed): a run is a method (``pgd_at``, ``sovr``, ...) or a variant of SOVR
for the open choices (``VARIANTS``: sovr_rho0.2, sovr_ovr_mean, sovr_clean_margin, ...).
Its workdir is WORKDIR/<run>_s<seed>. Stages (each skips what an earlier call finished, so
rerunning the command resumes):
  1. train    ``python -m sovr_jax.main --config configs/study.py:METHOD,SCALE`` per cell, up
              to ``--parallel`` at a time, a log per cell in WORKDIR/<cell>.log.
  2. attack   the JAX AutoAttack on the first ``--n`` test points of every cell
              (``python -m sovr_jax.autoattack_eval --engine jax``, per-point flags kept);
              on the ``--check`` cells also both engines side by side on the first
              ``--check_n`` points (``--engine both``), the reference's check of the JAX one.
  3. collect  one JSON (``--out``): per cell its method, flags, seed, command, versions,
              card and times; curves; test clean / PGD-20 / CW-20 (upper bounds); the raw
              adversarial margins of 2,000 training examples; the AutoAttack results (the
              per-point flags included) and the side-by-side check. ``--into`` merges the
              cells into an existing study JSON (``merge``: a newer run of a cell replaces the
              older one only if its evaluation got as far; the other is kept aside), so each
              GPU session adds its cells to one committed file.
``python -m scripts.plot_study`` draws the figures and tables from the JSON alone. A cell that
fails or times out is recorded with its error; the others go on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from sovr_jax import jsonio, rundir
from sovr_jax.evaluation import schema

METHODS = ("pgd_at", "sovr", "mail_at", "gairat", "trades", "mart", "ovr", "standard")
#: SOVR's open choices (../shared/docs/method.md), as runs: name -> (method, config flags).
VARIANTS = {
    "sovr_ovr_mean": ("sovr", ["--config.sovr.ovr_reduce=mean"]),
    "sovr_clean_margin": ("sovr", ["--config.sovr.margin_on=clean"]),
}
DEFAULT_RUNS = "pgd_at,sovr"
#: Epoch-line fields of metrics.jsonl kept in the collected curves.
CURVE_FIELDS = ("loss", "adv_acc", "clean_acc", "margin", "switched", "weight", "lr",
                "val_clean_acc", "val_pgd_acc", "images_per_s", "epoch_time_s")
CHECK_DIR = "autoattack_check"


def study_config(path: str, arg: str):
  """``get_config(arg)`` of the study's config file at ``path`` (e.g. ``sovr,full``)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: no config file {path!r} (a path from "
                            f"{os.getcwd()}; the study's is configs/study.py in a checkout).")
  spec = importlib.util.spec_from_file_location("_sovr_jax_study_config", os.path.abspath(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_spec(name: str) -> tuple[str, list[str]]:
  """(method, extra config flags) of a run name."""
  if name in METHODS:
    return name, []
  if name in VARIANTS:
    return VARIANTS[name]
  if name.startswith("sovr_rho"):
    rho = float(name.removeprefix("sovr_rho"))
    if not 0.0 < rho <= 1.0:
      raise ValueError(f"{name}: SOVR's ovr_fraction must lie in (0, 1].")
    return "sovr", [f"--config.sovr.ovr_fraction={rho:g}"]
  raise ValueError(f"Unknown run {name!r}; valid: {', '.join(METHODS)}, "
                   f"{', '.join(VARIANTS)}, or sovr_rho<fraction>.")


def cells(runs: str, seeds: str, sweep: str = "") -> dict[str, tuple[str, list[str], int]]:
  """{cell name: (method, flags, seed)} for ``--runs`` x ``--seeds`` and ``--sweep``."""
  names = [s.strip() for s in runs.split(",") if s.strip()]
  names += [f"sovr_rho{float(r):g}" for r in sweep.split(",") if r.strip()]
  seed_list = [int(s) for s in seeds.split(",") if s.strip()]
  out = {}
  for name in names:
    method, flags = run_spec(name)
    for seed in seed_list:
      out[f"{name}_s{seed}"] = (method, flags + [f"--config.seed={seed}"], seed)
  if not out:
    raise ValueError("Nothing to run: give --runs (and --seeds).")
  return out


def _run(cmd: list[str], log_path: str, timeout: float) -> dict[str, Any]:
  """Runs ``cmd`` from the working directory (output appended to ``log_path``)."""
  t0 = time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(cmd)}   # {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    log.flush()
    try:
      rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                          check=False).returncode
      error = None if rc == 0 else f"exit status {rc} (see {log_path})"
    except subprocess.TimeoutExpired:
      error = f"timed out after {timeout:.0f} s (see {log_path}); rerun to resume"
  return {"ok": error is None, "seconds": time.time() - t0, "error": error,
          "command": " ".join(cmd)}


def _train_command(args, method: str, flags: list[str], wd: str) -> list[str]:
  cmd = [sys.executable, "-m", "sovr_jax.main",
         f"--config={args.config}:{method},{args.scale}", f"--workdir={wd}", *flags]
  if args.data:
    cmd.append(f"--config.data.path={args.data}")
  if args.cache_dir:
    cmd.append(f"--config.data.cache_dir={args.cache_dir}")
  return cmd


def train_stage(specs, args) -> dict[str, dict[str, Any]]:
  """Trains the cells without a report.json, ``--parallel`` at a time."""
  todo = [n for n in specs
          if not os.path.exists(os.path.join(args.workdir, n, rundir.REPORT_FILE))]
  if todo:  # decode (and cache) the images once, not once per parallel run
    from sovr_jax import data  # pylint: disable=import-outside-toplevel
    d = study_config(args.config, f"sovr,{args.scale}").data
    data.load_dataset(d.name, source=d.source, path=args.data or d.path,
                      cache_dir=args.cache_dir or d.cache_dir, val_size=d.val_size)

  def one(name):
    method, flags, _ = specs[name]
    cmd = _train_command(args, method, flags, os.path.join(args.workdir, name))
    print(f"[study] train {name}: {' '.join(cmd[2:])}", flush=True)
    r = _run(cmd, os.path.join(args.workdir, f"{name}.log"), args.train_timeout)
    print(f"[study] train {name}: {'done' if r['ok'] else r['error']} in {r['seconds']:.0f} s",
          flush=True)
    return name, r

  with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
    return dict(pool.map(one, todo))


def attack_stage(specs, args) -> dict[str, dict[str, Any]]:
  """The JAX AutoAttack on every trained cell; both engines side by side on ``--check``."""
  check = set(filter(None, args.check.split(",")))
  status = {}
  for name in specs:
    wd = os.path.join(args.workdir, name)
    if not os.path.exists(os.path.join(wd, rundir.REPORT_FILE)):
      print(f"[study] {name}: not trained ({wd} holds no {rundir.REPORT_FILE}; see "
            f"{os.path.join(args.workdir, name + '.log')}): no AutoAttack", flush=True)
      continue
    base = [sys.executable, "-m", "sovr_jax.autoattack_eval", f"--workdir={wd}",
            f"--batch_size={args.aa_batch_size}", f"--seed={args.aa_seed}"]
    if args.attacks:
      base.append(f"--attacks={args.attacks}")
    # The check runs the JAX engine as the cell's own AutoAttack ran (attack dtype, runs per
    # call), so it checks the configuration that gave the reported figure.
    jax_flags = [f"--attack_dtype={args.attack_dtype}", f"--runs_at_once={args.runs_at_once}"]
    jobs = [(os.path.join(wd, rundir.AUTOATTACK_FILES["jax"]),
             base + ["--engine=jax", f"--n={args.n}", *jax_flags])]
    if name in check:
      out = os.path.join(wd, CHECK_DIR, rundir.AUTOATTACK_COMPARE_FILE)
      cmd = base + ["--engine=both", f"--n={args.check_n}", f"--out={out}", *jax_flags]
      cmd += [f"--device={args.device}"] if args.device else []
      cmd += [f"--threads={args.threads}"] if args.threads else []
      jobs.append((out, cmd))
    for out, cmd in jobs:
      if _finished(out):
        continue
      print(f"[study] AutoAttack {name} -> {out}", flush=True)
      r = _run(cmd, os.path.join(args.workdir, f"{name}.log"), args.aa_timeout)
      status.setdefault(name, []).append(r)
      print(f"[study] AutoAttack {name}: {'done' if r['ok'] else r['error']} in "
            f"{r['seconds']:.0f} s", flush=True)
  return status


def curves(workdir: str) -> list[dict[str, Any]]:
  """One row per epoch: the epoch's training means and its validation line, merged."""
  rows: dict[int, dict[str, Any]] = {}
  for rec in rundir.read_metrics(workdir):
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


def _finished(path: str) -> bool:
  """A result file that exists and is complete (a cut JAX run leaves an incomplete one)."""
  try:
    return _read_json(path).get("complete", True) is not False
  except (OSError, ValueError):
    return False


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def collect_cell(name: str, spec, args, status) -> dict[str, Any]:
  """Everything the study keeps of one cell."""
  method, flags, seed = spec
  wd = os.path.join(args.workdir, name)
  cell: dict[str, Any] = {"run": name.rsplit("_s", 1)[0], "method": method, "seed": seed,
                          "flags": flags, "status": status.get(name), "scale": args.scale,
                          "train_command": " ".join(_train_command(args, method, flags, wd)[1:])}
  report_path = os.path.join(wd, rundir.REPORT_FILE)
  if not os.path.exists(report_path):
    cell["not_trained"] = f"no {rundir.REPORT_FILE} in {wd}: training did not finish"
    return cell
  rep = _read_json(report_path)
  cfg = rep.get("config", {})
  cell.update({
      "ovr_fraction": cfg.get("sovr", {}).get("ovr_fraction") if method == "sovr" else None,
      "test": rep["test"], "timings": rep.get("timings"),
      "margins_summary": {k: v for k, v in rep["margins"].items() if k != "histogram"},
      "devices": rep.get("devices"), "device_kind": rep.get("device_kind"),
      "versions": rep.get("versions"), "command": rep.get("command"),
      "config_changes": rep.get("config_changes"), "curves": curves(wd)})
  if os.path.exists(os.path.join(wd, rundir.MARGINS_JSON)):
    cell["margins"] = _read_json(os.path.join(wd, rundir.MARGINS_JSON))
  results = []
  aa_path = os.path.join(wd, rundir.AUTOATTACK_FILES["jax"])
  if os.path.exists(aa_path):  # the robustness figure, with its per-point flags
    results.append({"role": "main", **schema.read(aa_path)})
  check = os.path.join(wd, CHECK_DIR, rundir.AUTOATTACK_COMPARE_FILE)
  if os.path.exists(check):
    cmp = _read_json(check)
    cell["autoattack_check"] = {k: v for k, v in cmp.items() if k != "files"}
    results += [{"role": "check", **schema.summary(schema.read(path))}
                for path in cmp.get("files", {}).values() if os.path.exists(path)]
  cell["autoattack"] = results
  return cell


def collect(specs, args, status) -> dict[str, Any]:
  return {"study": "SOVR reproduction, CIFAR-10 (JPEG copy), PreActResNet-18",
          "scale": args.scale,
          "base_config": study_config(args.config, f"sovr,{args.scale}").to_dict(),
          "cells": {name: collect_cell(name, spec, args, status)
                    for name, spec in specs.items()},
          "note": "PGD-20 and CW-20 accuracies are upper bounds; AutoAttack (the JAX engine "
                  "on the first n test points, checked against the reference on the check "
                  "cells) is the robustness figure.",
          "command": rundir.command(),
          "created": datetime.datetime.now().isoformat(timespec="seconds")}


def completeness(cell: dict[str, Any]) -> tuple[int, int, int, int]:
  """How far a cell's evaluation got, to compare two runs of one cell: (trained, has the
  complete AutoAttack, attacks finished, test points of its most advanced AutoAttack)."""
  if "test" not in cell:
    return (0, 0, 0, 0)
  from sovr_jax import study_report  # pylint: disable=import-outside-toplevel
  b = study_report.best_bound(cell)
  return (1, int(study_report.figure(cell) is not None), len(b[1]) if b else 0,
          b[2] if b else 0)


def merge(into: str, new: dict[str, Any], log=print) -> dict[str, Any]:
  """Adds ``new``'s cells to the study JSON at ``into`` (created if missing). A cell that is
  already there is replaced by the new run of it only if that got as far (``completeness``:
  trained, the complete AutoAttack, attacks finished, points; a tie goes to the newer), and
  the run not kept, if it trained, goes to ``set_aside[<cell>]`` with the reason: a rerun cut
  short never replaces a finished cell, and no trained cell's figures are dropped."""
  if not os.path.exists(into):
    return new
  old = _read_json(into)
  if old.get("scale") != new.get("scale"):
    raise ValueError(f"{into} holds the {old.get('scale')!r} scale, these cells the "
                     f"{new.get('scale')!r} scale; merge only cells of one schedule.")
  for name, cell in new["cells"].items():
    prev = old["cells"].get(name)
    if prev is None:
      old["cells"][name] = cell
      continue
    got, had = completeness(cell), completeness(prev)
    newer = got >= had
    kept, other = (cell, prev) if newer else (prev, cell)
    old["cells"][name] = kept
    if "test" in other:
      why = (f"replaced by the run merged from {new.get('command')!r} ({new.get('created')})"
             if newer else f"a rerun that got less far than the cell kept "
                           f"(completeness {got} < {had})")
      old.setdefault("set_aside", {}).setdefault(name, []).append({**other, "set_aside": why})
      log(f"[study] {name}: kept the {'new' if newer else 'earlier'} run; the other is in "
          f"set_aside[{name!r}] ({why}).")
  old.setdefault("merges", []).append({"command": new["command"], "created": new["created"],
                                       "cells": sorted(new["cells"])})
  return old


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m scripts.study", description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/study.py",
                 help="the study's config file (from the working directory)")
  p.add_argument("--scale", default="full", help="a scale of the config (full, gpu, cpu, tiny)")
  p.add_argument("--workdir", help="one folder per cell")
  p.add_argument("--out", help="the collected JSON of these cells")
  p.add_argument("--into", default="", help="also merge the cells into this study JSON")
  p.add_argument("--merge_from", nargs="*", default=[],
                 help="only merge these collected JSONs (or cell JSONs) into --into")
  p.add_argument("--runs", default=DEFAULT_RUNS,
                 help=f"methods and variants, from {METHODS + tuple(VARIANTS)} or sovr_rho<f>")
  p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
  p.add_argument("--sweep", default="", help="SOVR ovr_fraction values, e.g. 0.2,0.6")
  p.add_argument("--data", default="", help="CIFAR-10 JPEG folder or tarball "
                 "(default: the config's ../shared/data/cifar10-jpeg.tar.gz)")
  p.add_argument("--cache_dir", default="", help="decoded-image cache (default: the config's)")
  p.add_argument("--parallel", type=int, default=2, help="cells trained at a time")
  p.add_argument("--stages", default="train,attack,collect")
  p.add_argument("--check", default="", help="cells also attacked by both engines side by "
                 "side on the first --check_n points (comma-separated cell names)")
  p.add_argument("--attacks", default="", help="AutoAttack subset (default: standard four)")
  p.add_argument("--n", type=int, default=10000, help="AutoAttack test points (the first n)")
  p.add_argument("--check_n", type=int, default=1000)
  p.add_argument("--aa_batch_size", type=int, default=1000)
  p.add_argument("--aa_seed", type=int, default=0, help="AutoAttack seed")
  p.add_argument("--attack_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="the JAX AutoAttack's attack network (decisions stay float32)")
  p.add_argument("--runs_at_once", type=int, default=1,
                 help="the JAX AutoAttack's target classes of APGD-T / FAB-T per call (speed)")
  p.add_argument("--device", default="", help="torch device of the reference (default: auto)")
  p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads of the reference")
  p.add_argument("--train_timeout", type=float, default=3600.0, help="seconds per cell")
  p.add_argument("--aa_timeout", type=float, default=3600.0, help="seconds per AutoAttack")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  if args.merge_from:
    if not args.into:
      raise ValueError("--merge_from needs --into (the study JSON to add the cells to).")
    for path in args.merge_from:
      jsonio.write_json_atomic(args.into, merge(args.into, _read_json(path)))
      print(f"[study] merged {path} into {args.into}", flush=True)
    return _read_json(args.into)
  if not (args.workdir and args.out):
    raise ValueError("Give --workdir and --out (or --merge_from with --into).")
  study_config(args.config, f"sovr,{args.scale}")  # a missing file or an unknown scale: now
  stages = set(filter(None, args.stages.split(",")))
  unknown = stages - {"train", "attack", "collect"}
  if unknown:
    raise ValueError(f"Unknown stages {sorted(unknown)}; valid: train, attack, collect.")
  specs = cells(args.runs, args.seeds, args.sweep)
  args.workdir = os.path.abspath(args.workdir)
  args.data = os.path.abspath(args.data) if args.data else ""
  args.cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else ""
  os.makedirs(args.workdir, exist_ok=True)
  status: dict[str, Any] = {}
  if "train" in stages:
    for name, r in train_stage(specs, args).items():
      status[name] = {"train": r}
  if "attack" in stages:
    for name, r in attack_stage(specs, args).items():
      status.setdefault(name, {})["autoattack"] = r
  result: dict[str, Any] = {}
  if "collect" in stages:
    result = collect(specs, args, status)
    jsonio.write_json_atomic(args.out, result)
    print(f"[study] wrote {args.out}", flush=True)
    if args.into:
      jsonio.write_json_atomic(args.into, merge(args.into, result))
      print(f"[study] merged {len(result['cells'])} cell(s) into {args.into}", flush=True)
  return result


if __name__ == "__main__":
  main()
