"""Figures and tables of the reproduction study, from the committed JSON alone.

    python -m scripts.plot_study --study results/study_full.json --out results/study_full

(the command is a thin entry point; the tables live here, in the package, for its tests.)

writes OUT_margins.png (adversarial logit-margin histograms of training examples, one panel per
run at seed 0, the paper's Figure 1 style), OUT_curves.png (validation clean and PGD-20 accuracy
per epoch), OUT_sweep.png (SOVR's ovr_fraction against AutoAttack, PGD-AT as rho = 0) when the
study has a sweep, and OUT_table.md, also printed: per cell clean / PGD-20 / CW-20 (upper bounds)
/ AutoAttack; per run the mean +- std over seeds; SOVR - PGD-AT as a paired difference on the
same test points per seed and pooled (McNemar's exact test, pooled its generalisation with the
test point as the unit; paired bootstrap 95 % interval resampling test points;
``sovr_jax.stats``), where both have per-point AutoAttack flags (on the attacks both finished,
labelled as upper bounds, where a session's time cut an AutoAttack), with the sanity gate's
reading and a plain verdict; and the margin statistics (``sovr_jax.stats.margin_statistics``,
with bootstrap standard errors, and ``margin_peaks``) with a reading of the paper's claim 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from sovr_jax import stats
from sovr_jax.evaluation import schema

LABELS = {"pgd_at": "PGD-AT", "sovr": "SOVR", "mail_at": "MAIL-AT", "gairat": "GAIRAT",
          "trades": "TRADES", "mart": "MART", "ovr": "OVR", "standard": "standard",
          "sovr_ovr_mean": "SOVR (OVR mean)", "sovr_clean_margin": "SOVR (clean margins)"}


#: The sanity gate of the real-schedule study (docs/results.md): PGD-AT must reach this clean
#: and AutoAttack accuracy before any claim about the paper (Rice et al. 2020 report ~52 % PGD
#: for the early-stopped PreActResNet-18; third-party PGD-AT figures for ResNet-18 are ~82.9 %
#: clean / ~46.7 % AutoAttack). Below it the models are not the converged ones the paper's
#: claims are about.
GATE = {"clean": 0.78, "autoattack": 0.44}


def label(run: str) -> str:
  if run.startswith("sovr_rho"):
    return f"SOVR (rho={run.removeprefix('sovr_rho')})"
  return LABELS.get(run, run)


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.2f}"


def figure(cell: dict[str, Any]) -> dict[str, Any] | None:
  """The cell's AutoAttack figure: the complete standard-version result on the most points
  (the reference preferred at equal n), else None."""
  full = [r for r in cell.get("autoattack") or []
          if r.get("version") == "standard" and r.get("robust_acc") is not None]
  if not full:
    return None
  return max(full, key=lambda r: (r["n"], r["engine"] == "reference"))


def finished(r: dict[str, Any]) -> tuple[str, ...]:
  """The attacks of result ``r`` that finished, in the order they ran (all of them for a
  complete run; the first few for a run cut short)."""
  after = r.get("robust_acc_after") or {}
  done = []
  for a in r.get("attacks", ()):
    if after.get(a) is None:
      break
    done.append(a)
  return tuple(done)


def flags_after(r: dict[str, Any], attacks: Sequence[str]) -> np.ndarray:
  """Per point: robust to ``attacks``, the first few of those ``r`` finished. For all of
  them, ``r``'s robust flags; for fewer, correct on clean input and broken by none of them,
  from ``r``'s record of which attack broke each point (each attack ran on every point still
  robust before it)."""
  p = schema.decode_points(r)
  if tuple(attacks) == finished(r):
    return p["robust"]
  if tuple(attacks) != finished(r)[:len(attacks)]:
    raise ValueError(f"{list(attacks)} are not the first attacks {r['engine']} finished "
                     f"({list(finished(r))}).")
  return p["clean"] & ~np.isin(p["broken_by"].astype(str), list(attacks))


def _attacks_text(attacks: Sequence[str]) -> str:
  return " + ".join(a.upper() for a in attacks)


def bounds(cell: dict[str, Any]) -> list[dict[str, Any]]:
  """AutoAttack results that are upper bounds: an attack subset, or a run cut short."""
  main = figure(cell)
  return [r for r in cell.get("autoattack") or [] if r is not main
          and (r.get("version") != "standard" or r.get("robust_acc") is None)]


def _aa_text(r: dict[str, Any] | None) -> str:
  if r is None:
    return "-"
  name = "JAX" if r["engine"] == "jax" else "reference"
  if r.get("robust_acc") is not None and r.get("version") == "standard":
    return f"{_pct(r['robust_acc'])} ({name}, n={r['n']})"
  done = finished(r)
  return (f"<= {_pct(r['robust_acc_after'][done[-1]])} ({_attacks_text(done)}, {name}, "
          f"n={r['n']})") if done else "-"


def cell_table(study: dict[str, Any]) -> str:
  """Markdown: one row per cell, the best-by-validation checkpoint."""
  rows = ["| cell | best epoch | clean | PGD-20 (upper bound) | CW-20 (upper bound) | "
          "AutoAttack | upper bounds from attack subsets | train time |",
          "|---|---|---|---|---|---|---|---|"]
  for name, cell in study["cells"].items():
    t = (cell.get("test") or {}).get("best")
    if not t:
      st = cell.get("status") or {}
      errs = [v.get("error") for v in st.values() if isinstance(v, dict) and v.get("error")]
      rows.append(f"| {name} | not trained: {'; '.join(errs) or 'no report'} | | | | | | |")
      continue
    train_s = (cell.get("timings") or {}).get("train_s")
    rows.append(f"| {name} | {t['epoch']} | {_pct(t['clean_acc'])} | {_pct(t['pgd_acc'])} | "
                f"{_pct(t.get('cw_acc'))} | {_aa_text(figure(cell))} | "
                f"{'; '.join(_aa_text(r) for r in bounds(cell)) or '-'} | "
                f"{'-' if train_s is None else f'{train_s:.0f} s'} |")
  return "\n".join(rows)


def by_run(study: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
  out: dict[str, dict[int, dict[str, Any]]] = {}
  for cell in study["cells"].values():
    out.setdefault(cell["run"], {})[int(cell["seed"])] = cell
  return out


def run_table(study: dict[str, Any]) -> str:
  """Markdown: per run, mean +- sample std (ddof 1) over its seeds of clean and AutoAttack
  accuracy, in percent."""
  rows = ["| run | seeds | clean (%) | AutoAttack (%) | PGD-20 (%, upper bound) |",
          "|---|---|---|---|---|"]
  for run, seeds in by_run(study).items():
    done = {s: c for s, c in seeds.items() if (c.get("test") or {}).get("best")}
    if not done:
      continue
    clean = stats.mean_std([c["test"]["best"]["clean_acc"] for c in done.values()])
    pgd = stats.mean_std([c["test"]["best"]["pgd_acc"] for c in done.values()])
    aa = [figure(c) for c in done.values()]
    if all(aa):
      aa_text = _ms(stats.mean_std([r["robust_acc"] for r in aa]))
      if len({(r["n"], r["engine"]) for r in aa}) > 1:  # a seed fell back to another result
        aa_text += " (mixed: " + ", ".join(
            f"seed {s} n={r['n']} {'JAX' if r['engine'] == 'jax' else 'reference'}"
            for s, r in zip(done, aa)) + ")"
    else:  # an upper bound, where every seed's bound rests on the same attacks
      sub = [best_bound(c) for c in done.values()]
      same = all(sub) and len({b[1] for b in sub}) == 1
      aa_text = (f"<= {_ms(stats.mean_std([b[0] for b in sub]))} ({_attacks_text(sub[0][1])})"
                 if same else "-")
    rows.append(f"| {label(run)} | {','.join(map(str, sorted(done)))} | {_ms(clean)} | "
                f"{aa_text} | {_ms(pgd)} |")
  return "\n".join(rows)


def best_bound(cell: dict[str, Any]) -> tuple[float, tuple[str, ...], int] | None:
  """(robust accuracy after the attacks that finished, those attacks, n) of the cell's
  AutoAttack result that finished the most attacks (on the most points): an upper bound of
  its AutoAttack; None without one."""
  subs = [(r, finished(r)) for r in cell.get("autoattack") or []]
  subs = [(r, f) for r, f in subs if f]
  if not subs:
    return None
  r, f = max(subs, key=lambda x: (len(x[1]), x[0]["n"]))
  return r["robust_acc_after"][f[-1]], f, r["n"]


def _ms(m: dict[str, Any]) -> str:
  return f"{100 * m['mean']:.2f}" + ("" if m["std"] is None else f" +- {100 * m['std']:.2f}")


def _common_prefix(x: Sequence[str], y: Sequence[str]) -> tuple[str, ...]:
  out = []
  for p, q in zip(x, y):
    if p != q:
      break
    out.append(p)
  return tuple(out)


def _pair(ca: dict[str, Any], cb: dict[str, Any]):
  """The two results to compare on the same test points, and the attacks both finished:
  the two cells' AutoAttack figures when both have one on the same points; else the results
  with per-point flags on the most points and the most attacks both finished first (an upper
  bound of AutoAttack on each side). None when there is none."""
  fa, fb = figure(ca), figure(cb)
  best, key = None, None
  for ra in ca.get("autoattack") or []:
    for rb in cb.get("autoattack") or []:
      if "points" not in ra or "points" not in rb or schema.comparable(ra, rb):
        continue
      common = _common_prefix(finished(ra), finished(rb))
      if not common:
        continue
      full = ra is fa and rb is fb and common == tuple(ra["attacks"]) == tuple(rb["attacks"])
      k = (full, ra["n"], len(common))
      if key is None or k > key:
        best, key = (ra, rb, common, full), k
  return best


def paired(study: dict[str, Any], a: str = "pgd_at", b: str = "sovr",
           n_boot: int = 10000) -> list[dict[str, Any]]:
  """b - a on the same test points, per seed and pooled over the seeds both have, from the
  per-point flags of each cell's AutoAttack figure (same n). Where a seed's AutoAttack is not
  complete on both sides (a run cut by the session's time, or an attack subset), the row
  compares the attacks both finished on the same points: ``complete`` False and ``attacks``
  say so, and each side's accuracy is an upper bound of its AutoAttack. Pooled rows take the
  most seeds whose results are on the same test points (``schema.comparable``: n, threat
  model, data set and ``points_sha256``; point i is the same image in each), at the attacks
  all of them finished. Each row's "test" is ``stats.paired_sign_test``: McNemar's exact test
  for one seed; pooled, its exact generalisation with the test point as the unit, as the
  pooled bootstrap interval has."""
  runs = by_run(study)
  chosen = {}
  for seed in sorted(set(runs.get(a, {})) & set(runs.get(b, {}))):
    pair = _pair(runs[a][seed], runs[b][seed])
    if pair:
      chosen[seed] = pair
  groups = [[seed] for seed in chosen]
  classes: list[list[int]] = []  # seeds whose results are on the same points
  for seed in chosen:
    same = [c for c in classes if not schema.comparable(chosen[c[0]][0], chosen[seed][0])]
    if same:
      same[0].append(seed)
    else:
      classes.append([seed])
  if classes:  # the most seeds; a tie: the most points
    pool = max(classes, key=lambda c: (len(c), chosen[c[0]][0]["n"]))
    if len(pool) > 1:
      groups.append(pool)
  out = []
  for seeds in groups:
    attacks = functools.reduce(_common_prefix, (chosen[s][2] for s in seeds))
    if not attacks:
      continue
    fa = np.stack([flags_after(chosen[s][0], attacks) for s in seeds])
    fb = np.stack([flags_after(chosen[s][1], attacks) for s in seeds])
    row = {**stats.paired_bootstrap(fa, fb, n_boot=n_boot), "seeds": seeds,
           "test": stats.paired_sign_test(fa, fb), "attacks": list(attacks),
           "complete": all(chosen[s][3] for s in seeds)}
    if len(seeds) > 1:  # training's own spread: the per-seed differences, a t interval
      row["seed_diffs"] = [float(d) for d in (fb.mean(1) - fa.mean(1))]
      row["over_seeds"] = stats.seed_interval(row["seed_diffs"])
    out.append(row)
  return out


def _measure(r: dict[str, Any]) -> str:
  return ("AutoAttack" if r["complete"] else
          f"{_attacks_text(r['attacks'])} only (upper bounds of AutoAttack)")


def paired_table(study: dict[str, Any], a: str = "pgd_at", b: str = "sovr",
                 rows: list[dict[str, Any]] | None = None) -> str:
  """Markdown: the rows of ``paired`` (computed here unless given)."""
  pairs = paired(study, a, b) if rows is None else rows
  lines = [f"| {label(b)} - {label(a)} | seeds | n per seed | difference (percentage points) | "
          f"95 % interval (paired bootstrap over test points, for these trained models) | "
          f"robust under "
          f"{label(b)} only / {label(a)} only (pooled: summed over seeds) | p (McNemar; "
          f"pooled: exact, per test point) | over seeds: mean +- sample std of the per-seed "
          f"differences, 95 % t interval (training's spread too) | attacks |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in pairs:
    m, s = r["test"], r.get("over_seeds")
    over = (f"{100 * s['mean']:+.2f} +- {100 * s['std']:.2f}: [{100 * s['low']:+.2f}, "
            f"{100 * s['high']:+.2f}]" if s else "")
    lines.append(f"| {'pooled' if len(r['seeds']) > 1 else 'seed'} | "
                 f"{','.join(map(str, r['seeds']))} | {r['n']} | {100 * r['diff']:+.2f} | "
                 f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}] | {m['b_only']} / "
                 f"{m['a_only']} | {stats.format_p(m['p_value'])} | {over} | {_measure(r)} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def margin_table(study: dict[str, Any]) -> str:
  """Markdown: the margin statistics of every cell with raw margins (``stats``), +- one
  bootstrap standard error, and where the histogram peaks (``stats.margin_peaks``)."""
  rows = ["| cell | n | std of margins | fraction with abs(margin) < 0.25 | "
          "mean of the switched set (SOVR's selection, rho 0.4 unless named) | peaks |",
          "|---|---|---|---|---|---|"]
  for cell in study["cells"].values():
    m = cell.get("margins")
    if not m:
      continue
    s = stats.margin_statistics(m["margins"], m.get("small_margin"))
    peaks = stats.margin_peaks(m["margins"])
    seed = int(cell["seed"])
    name = label(cell["run"]) + (f" (seed {seed})" if seed else "")
    rows.append(f"| {name} | {s['n']} | {s['std']:.2f} +- {s['std_se']:.2f} | "
                f"{s['near_zero']:.2f} +- {s['near_zero_se']:.2f} | "
                f"{s['mean_switched']:.2f} +- {s['mean_switched_se']:.2f} | "
                f"{len(peaks)} ({', '.join(f'{x:+.2f}' for x in peaks)}) |")
  return "\n".join(rows)


def claim2(study: dict[str, Any], a: str = "pgd_at", b: str = "sovr") -> str:
  """The paper's claim 2 read off the seeds both runs have: is ``a``'s margin histogram
  two-peaked, and does ``b``'s switched set end with larger margins than the same selection
  replayed on ``a``'s model (difference +- the two bootstrap standard errors combined)?"""
  runs = by_run(study)
  out = []
  for seed in sorted(set(runs.get(a, {})) & set(runs.get(b, {}))):
    ma, mb = runs[a][seed].get("margins"), runs[b][seed].get("margins")
    if not (ma and mb):
      continue
    sa = stats.margin_statistics(ma["margins"], ma.get("small_margin"))
    sb = stats.margin_statistics(mb["margins"], mb.get("small_margin"))
    peaks = stats.margin_peaks(ma["margins"])
    d = sb["mean_switched"] - sa["mean_switched"]
    se = math.hypot(sa["mean_switched_se"], sb["mean_switched_se"])
    shape = "two-peaked" if len(peaks) > 1 else "not two-peaked"
    out.append(f"Seed {seed}: {label(a)}'s margins have {len(peaks)} peak"
               f"{'s' if len(peaks) != 1 else ''} ({shape}); {label(b)}'s switched set ends "
               f"at a mean margin of {sb['mean_switched']:.2f}, {label(a)}'s at "
               f"{sa['mean_switched']:.2f}: {d:+.2f} +- {se:.2f}.")
  return " ".join(out)


def _seed0(study):
  return [(name, c) for name, c in study["cells"].items() if int(c["seed"]) == 0]


def plot_margins(study, path, plt):
  cells = [(n, c) for n, c in _seed0(study) if c.get("margins")]
  if not cells:
    return False
  allm = np.concatenate([np.asarray(c["margins"]["margins"]) for _, c in cells])
  bins = np.linspace(np.percentile(allm, 0.5), np.percentile(allm, 99.5), 50)
  cols = min(4, len(cells))
  rows = math.ceil(len(cells) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False,
                           sharex=True)
  for ax, (_, cell) in zip(axes.flat, cells):
    m = np.asarray(cell["margins"]["margins"])
    ax.hist(m, bins, color="tab:blue", alpha=0.8)
    if cell["method"] == "sovr":
      small = np.asarray(cell["margins"]["small_margin"], bool)
      ax.hist(m[small], bins, color="tab:orange", alpha=0.8,
              label=f"switched to OVR ({small.mean():.0%})")
      ax.legend(fontsize=7)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_title(f"{label(cell['run'])}  (mean {m.mean():.2f})", fontsize=9)
    ax.set_xlabel("logit margin on PGD examples", fontsize=8)
  for ax in list(axes.flat)[len(cells):]:
    ax.axis("off")
  fig.suptitle(f"{study['study']} ({study['scale']}): adversarial logit margins of "
               f"{cells[0][1]['margins']['n']} training examples, final models, seed 0",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_curves(study, path, plt):
  cells = [(n, c) for n, c in _seed0(study) if c.get("curves")]
  if not cells:
    return False
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
  for _, cell in cells:
    val = [c for c in cell["curves"] if "val_pgd_acc" in c]
    ep = [c["epoch"] for c in val]
    a1.plot(ep, [c["val_pgd_acc"] for c in val], "o-", label=label(cell["run"]), ms=3)
    a2.plot(ep, [c["val_clean_acc"] for c in val], "o-", label=label(cell["run"]), ms=3)
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


def sweep_points(study) -> list[tuple[float, float | None, float]]:
  """(rho, AutoAttack acc or None, PGD-20 acc) of the seed-0 SOVR cells and PGD-AT (rho 0)."""
  pts = []
  for _, cell in _seed0(study):
    t = (cell.get("test") or {}).get("best")
    if not t or cell["method"] not in ("sovr", "pgd_at") or cell["run"] in (
        "sovr_ovr_mean", "sovr_clean_margin"):
      continue
    rho = 0.0 if cell["method"] == "pgd_at" else float(cell["ovr_fraction"])
    f = figure(cell)
    pts.append((rho, f["robust_acc"] if f else None, t["pgd_acc"]))
  return sorted(pts, key=lambda p: p[0])


def plot_sweep(study, path, plt):
  pts = sweep_points(study)
  if len([p for p in pts if p[0] > 0]) < 2:
    return False
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="PGD-20 (upper bound)")
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


def gate(study: dict[str, Any], run: str = "pgd_at") -> tuple[bool | None, str]:
  """(met, sentence): does every seed of ``run`` reach ``GATE``? A seed with a complete
  AutoAttack is checked on it. A seed without one is checked on the upper bound that the
  attacks it finished give: below the gate, the gate is not met (the complete AutoAttack can
  only be lower); above it, only provisionally (None). A seed that did not train, or has no
  AutoAttack result, leaves the gate unchecked (None) unless another seed fails it. None while
  no seed has either."""
  rows, unchecked = [], []
  for s, c in sorted(by_run(study).get(run, {}).items()):
    if not (c.get("test") or {}).get("best"):
      unchecked.append(f"seed {s} did not train")
      continue
    clean, f, bound = c["test"]["best"]["clean_acc"], figure(c), best_bound(c)
    if f:
      rows.append((s, clean, f["robust_acc"], f["n"], None))
    elif bound:
      acc, attacks, n = bound
      rows.append((s, clean, acc, n, attacks))
    else:
      unchecked.append(f"seed {s} has no AutoAttack result")
  head = (f"Sanity gate ({label(run)} >= {100 * GATE['clean']:.0f} % clean and >= "
          f"{100 * GATE['autoattack']:.0f} % under AutoAttack, docs/results.md)")
  if not rows:
    return None, (f"{head}: not checkable yet (no {label(run)} cell with an AutoAttack "
                  f"result).")
  passes = [clean >= GATE["clean"] and aa >= GATE["autoattack"] for _, clean, aa, _, _ in rows]
  said = "; ".join(
      f"seed {s}: {_pct(clean)} % clean, "
      + (f"{_pct(aa)} % AutoAttack (n={n})" if sub is None else
         f"<= {_pct(aa)} % AutoAttack ({_attacks_text(sub)} only, n={n})")
      for s, clean, aa, n, sub in rows)
  if all(passes) and unchecked:
    return None, (f"{head}: met on the seeds checked ({said}), but {'; '.join(unchecked)}: "
                  f"not checked there yet.")
  if all(passes) and all(r[4] is None for r in rows):
    return True, f"{head}: met ({said})."
  if all(passes):
    return None, (f"{head}: met provisionally ({said}): where only some attacks finished, "
                  f"the complete AutoAttack can still fall below the gate.")
  return False, (f"{head}: **not met** ({said}). These models are not the converged ones the "
                 f"paper's claims are about: the differences below describe them, not the "
                 f"paper. Lengthen the schedule (configs/study.py:METHOD,full,EPOCHS) before "
                 f"comparing methods.")


def verdict(study: dict[str, Any], a: str = "pgd_at", b: str = "sovr",
            rows: list[dict[str, Any]] | None = None) -> str:
  """The paired difference over the most seeds, said plainly: shown, or not at this budget
  (the pooled interval contains 0, or a seed's own interval excludes 0 the other way); where
  the t interval over seeds contains 0, shown for these models only; provisional where it
  rests on some of AutoAttack's attacks only."""
  rows = paired(study, a, b) if rows is None else rows
  if not rows:
    return ""
  if len(rows) > 1 and all(len(x["seeds"]) == 1 for x in rows):
    per = "; ".join(f"seed {x['seeds'][0]} (n={x['n']}, {_measure(x)}): {100 * x['diff']:+.2f} "
                    f"points, 95 % [{100 * x['low']:+.2f}, {100 * x['high']:+.2f}]" for x in rows)
    return (f"{label(b)} - {label(a)}: the seeds cannot be pooled (no two of them were attacked "
            f"on the same test points with the same attacks finished), so a difference over "
            f"seeds is not shown; per seed: {per}.")
  r = max(rows, key=lambda r: len(r["seeds"]))
  what = (f"{label(b)} - {label(a)} under {_measure(r)}, seeds "
          f"{','.join(map(str, r['seeds']))}, {r['n']} test points: {100 * r['diff']:+.2f} "
          f"points, 95 % interval [{100 * r['low']:+.2f}, {100 * r['high']:+.2f}] (test "
          f"points resampled, for these trained models), p = "
          f"{stats.format_p(r['test']['p_value'])}")
  sign = 1 if r["diff"] > 0 else -1
  against = [x["seeds"][0] for x in rows if len(x["seeds"]) == 1 and x["seeds"][0] in r["seeds"]
             and (x["high"] < 0 if sign > 0 else x["low"] > 0)]
  over = r.get("over_seeds")
  if r["low"] <= 0.0 <= r["high"]:
    said = f"{what}: the interval contains 0, a difference is not shown at this budget."
  elif against:
    said = (f"{what}: the seeds disagree (seed {', '.join(map(str, against))}: the other way, "
            f"its own interval excludes 0), so a difference is not shown at this budget.")
  else:
    said = (f"{what}: {label(b)} {'above' if r['diff'] > 0 else 'below'} {label(a)} on these "
            f"models.")
    if over and over["low"] <= 0.0 <= over["high"]:
      said += (f" Over the {over['seeds']} seeds (each seed's difference, a t interval that "
               f"includes training's spread) it is {100 * over['mean']:+.2f} +- "
               f"{100 * over['std']:.2f}, 95 % [{100 * over['low']:+.2f}, "
               f"{100 * over['high']:+.2f}]: for the method beyond these models, not shown "
               f"at this budget.")
    elif over:
      said += (f" Over the {over['seeds']} seeds (t interval, training's spread included): "
               f"95 % [{100 * over['low']:+.2f}, {100 * over['high']:+.2f}].")
  if not r["complete"]:
    said += (" Provisional: the complete AutoAttack (the remaining attacks) can change "
             "either side.")
  return said


def tables(study: dict[str, Any]) -> str:
  parts = ["Per cell (best-by-validation checkpoint):", cell_table(study),
           "Per run, over seeds (mean +- sample standard deviation, ddof 1):", run_table(study),
           gate(study)[1]]
  rows = paired(study)
  pair = paired_table(study, rows=rows)
  if pair:
    parts += ["Paired on the same test points (per-point flags; the attacks column says "
              "whether the complete AutoAttack or only some of its attacks):", pair,
              verdict(study, rows=rows)]
  parts += ["Adversarial logit margins of training examples (final models; each figure +- "
            "one bootstrap standard error over the examples):",
            margin_table(study)]
  reading = claim2(study)
  if reading:
    parts += [f"Claim 2: {reading}"]
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> list[str]:
  p = argparse.ArgumentParser(prog="python -m scripts.plot_study",
                              description=__doc__.split("\n")[0])
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
  md = tables(study)
  with open(f"{args.out}_table.md", "w") as f:
    f.write(md + "\n")
  written.append(f"{args.out}_table.md")
  print(md)
  print("wrote " + ", ".join(written))
  return written


if __name__ == "__main__":
  main()
