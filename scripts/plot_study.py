"""Figures and tables of the reproduction study, from the committed JSON alone.

    python -m scripts.plot_study --study results/study_gpu.json --out results/study_gpu

writes OUT_margins.png (adversarial logit-margin histograms of training examples, one panel per
method, the paper's Figure 1 style), OUT_curves.png (validation clean and PGD-20 accuracy per
epoch), OUT_sweep.png (SOVR's ovr_fraction against AutoAttack, or PGD-20 where AutoAttack is
missing, with PGD-AT as rho = 0) when the study has a sweep, and prints the results table as
Markdown (also OUT_table.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Sequence

import numpy as np

LABELS = {"pgd_at": "PGD-AT", "sovr": "SOVR", "mail_at": "MAIL-AT", "gairat": "GAIRAT",
          "trades": "TRADES", "mart": "MART", "ovr": "OVR", "standard": "standard"}


def label(name: str, run: dict[str, Any]) -> str:
  if name.startswith("sovr_rho"):  # the name's rho where the run has no report yet
    return f"SOVR (rho={run.get('ovr_fraction') or name.removeprefix('sovr_rho')})"
  return LABELS.get(name, name)


def autoattack_acc(run: dict[str, Any]) -> tuple[float | None, str]:
  """(robust accuracy, engine) preferring the reference; (None, '') if not attacked."""
  aa = run.get("autoattack") or {}
  for engine in ("reference", "jax", "jax_apgd"):
    s = aa.get(engine)
    if s and s.get("robust_acc") is not None:
      return float(s["robust_acc"]), engine
  return None, ""


#: AutoAttack results a run can hold: (key in run["autoattack"], column title).
AA_COLUMNS = (("jax_apgd", "APGD-CE + APGD-T (JAX)"), ("jax", "AutoAttack (JAX)"),
              ("reference", "AutoAttack (reference)"))


def _pct(v):
  return "-" if v is None else f"{100 * v:.2f}"


def aa_cell(s: dict[str, Any] | None) -> str:
  """'33.40 (n=1000)', or the accuracy after the last attack run when incomplete."""
  if not s:
    return "-"
  after = s.get("robust_acc_after") or {}
  if s.get("robust_acc") is not None:
    return f"{_pct(s['robust_acc'])} (n={s.get('n')})"
  if after:
    last = list(after)[-1]
    return f"{_pct(after[last])} after {last} (n={s.get('n')})"
  return "-"


def table(study: dict[str, Any]) -> str:
  """Markdown: clean / PGD-20 / CW-20 (upper bounds) / AutoAttack of the best checkpoint."""
  cols = [c for c in AA_COLUMNS
          if any((r.get("autoattack") or {}).get(c[0]) for r in study["runs"].values())]
  head = ("| run | best epoch | clean | PGD-20 (upper bound) | CW-20 (upper bound) | "
          + "".join(f"{title} | " for _, title in cols)
          + "margin mean (small-margin / other) | train time |")
  rows = [head, "|" + "---|" * (7 + len(cols))]
  for name, run in study["runs"].items():
    t = (run.get("test") or {}).get("best")
    if not t:
      rows.append(f"| {label(name, run)} | not trained: {_status(run)} |" + " |" * (5 + len(cols)))
      continue
    aa = run.get("autoattack") or {}
    m = run.get("margins_summary") or {}
    margins = (f"{m['mean']:.2f} ({m['mean_small_margin']:.2f} / {m['mean_other']:.2f})"
               if m.get("mean_other") is not None else "-")
    train_s = (run.get("timings") or {}).get("train_s")
    rows.append(f"| {label(name, run)} | {t['epoch']} | {_pct(t['clean_acc'])} | "
                f"{_pct(t['pgd_acc'])} | {_pct(t.get('cw_acc'))} | "
                + "".join(f"{aa_cell(aa.get(key))} | " for key, _ in cols)
                + f"{margins} | {'-' if train_s is None else f'{train_s:.0f} s'} |")
  return "\n".join(rows)


def _status(run):
  st = run.get("status") or {}
  errs = [v.get("error") for v in st.values() if isinstance(v, dict) and v.get("error")]
  return "; ".join(errs) or "no report"


def plot_margins(study, path, plt):
  runs = [(n, r) for n, r in study["runs"].items() if r.get("margins")]
  if not runs:
    return False
  allm = np.concatenate([np.asarray(r["margins"]["margins"]) for _, r in runs])
  lo, hi = np.percentile(allm, 0.5), np.percentile(allm, 99.5)
  bins = np.linspace(lo, hi, 50)
  cols = min(4, len(runs))
  rows = math.ceil(len(runs) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False,
                           sharex=True)
  for ax, (name, run) in zip(axes.flat, runs):
    m = np.asarray(run["margins"]["margins"])
    ax.hist(m, bins, color="tab:blue", alpha=0.8)
    if run["method"] == "sovr":
      small = np.asarray(run["margins"]["small_margin"], bool)
      ax.hist(m[small], bins, color="tab:orange", alpha=0.8,
              label=f"switched to OVR ({small.mean():.0%})")
      ax.legend(fontsize=7)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_title(f"{label(name, run)}  (mean {m.mean():.2f})", fontsize=9)
    ax.set_xlabel("logit margin on PGD examples", fontsize=8)
  for ax in list(axes.flat)[len(runs):]:
    ax.axis("off")
  fig.suptitle(f"{study['study']} ({study['scale']}): adversarial logit margins of "
               f"{runs[0][1]['margins']['n']} training examples, final models", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_curves(study, path, plt):
  runs = [(n, r) for n, r in study["runs"].items() if r.get("curves")]
  if not runs:
    return False
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
  for name, run in runs:
    ep = [c["epoch"] for c in run["curves"] if "val_pgd_acc" in c]
    a1.plot(ep, [c["val_pgd_acc"] for c in run["curves"] if "val_pgd_acc" in c], "o-",
            label=label(name, run), ms=3)
    a2.plot(ep, [c["val_clean_acc"] for c in run["curves"] if "val_pgd_acc" in c], "o-",
            label=label(name, run), ms=3)
  a1.set_title("validation PGD-20 accuracy (upper bound)", fontsize=9)
  a2.set_title("validation clean accuracy", fontsize=9)
  for a in (a1, a2):
    a.set_xlabel("epoch")
    a.grid(alpha=0.3)
  a2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def sweep_points(study) -> list[tuple[float, float | None, float | None, str]]:
  """(rho, AutoAttack acc, PGD-20 acc, AutoAttack engine) for SOVR runs and PGD-AT (rho = 0)."""
  pts = []
  for run in study["runs"].values():
    t = (run.get("test") or {}).get("best")
    if not t or run["method"] not in ("sovr", "pgd_at"):
      continue
    rho = 0.0 if run["method"] == "pgd_at" else float(run["ovr_fraction"])
    aa, engine = autoattack_acc(run)
    pts.append((rho, aa, t["pgd_acc"], engine))
  return sorted(pts)


def plot_sweep(study, path, plt):
  pts = sweep_points(study)
  if len([p for p in pts if p[0] > 0]) < 2:
    return False
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  rho = [p[0] for p in pts]
  ax.plot(rho, [p[2] for p in pts], "s--", label="PGD-20 (upper bound)")
  aa = [(p[0], p[1]) for p in pts if p[1] is not None]
  if aa:
    ax.plot(*zip(*aa), "o-", label="AutoAttack")
  ax.set_xlabel("ovr_fraction rho (0 = PGD-AT, all CE)")
  ax.set_ylabel("robust accuracy (test)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"SOVR ovr_fraction sweep ({study['scale']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv: Sequence[str] | None = None) -> list[str]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--study", required=True, help="scripts/study.py's JSON")
  p.add_argument("--out", required=True, help="output prefix")
  args = p.parse_args(argv)
  with open(args.study) as f:
    study = json.load(f)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  written = []
  for suffix, fn in (("margins", plot_margins), ("curves", plot_curves), ("sweep", plot_sweep)):
    path = f"{args.out}_{suffix}.png"
    if fn(study, path, plt):
      written.append(path)
  md = table(study)
  with open(f"{args.out}_table.md", "w") as f:
    f.write(md + "\n")
  written.append(f"{args.out}_table.md")
  print(md)
  print("wrote " + ", ".join(written))
  return written


if __name__ == "__main__":
  main()
