"""The two engines side by side on the same points: accuracy after each attack, time, and the
agreement of the final per-point robust flags.

``compare(jax_result, reference_result)`` returns the comparison written by
``python -m sovr_jax.autoattack_eval --engine both`` (next to both engines' own results):
one row per attack (and "clean") with both accuracies, their difference, both times (the
JAX compile time apart) and the speed-up; the fraction of points whose final robust flag
agrees; and McNemar's test of the two engines' flags (``sovr_jax.stats``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sovr_jax import stats
from sovr_jax.evaluation import schema


def compare(jax_result: dict[str, Any], ref_result: dict[str, Any]) -> dict[str, Any]:
  for r in (jax_result, ref_result):
    schema.validate(r)
  why = schema.comparable(jax_result, ref_result)
  if why is None and jax_result["attacks"] != ref_result["attacks"]:
    why = f"attacks {jax_result['attacks']} against {ref_result['attacks']}"
  if why:
    raise ValueError(f"the two results are not on the same points and attacks ({why}).")
  rows = [_row("clean", jax_result["clean_acc"], ref_result["clean_acc"], None, None)]
  for a in jax_result["attacks"]:
    rows.append(_row(a, jax_result["robust_acc_after"][a], ref_result["robust_acc_after"][a],
                     jax_result["time_s"][a], ref_result["time_s"][a]))
  total_j, total_r = jax_result["total_time_s"], ref_result["total_time_s"]
  rows.append(_row("total", None, None, total_j, total_r))
  pj, pr = schema.decode_points(jax_result), schema.decode_points(ref_result)
  return {
      "rows": rows,
      "robust_flag_agreement": float(np.mean(pj["robust"] == pr["robust"])),
      "mcnemar_jax_vs_reference": stats.mcnemar(pj["robust"], pr["robust"]),
      "jax_compile_s": float(sum(e.get("compile_s") or 0.0 for e in jax_result["per_attack"])),
      "total_time_s": {"jax": total_j, "reference": total_r},
  }


def _row(name, acc_j, acc_r, t_j, t_r) -> dict[str, Any]:
  diff = None if acc_j is None or acc_r is None else acc_j - acc_r
  return {"attack": name, "jax_acc": acc_j, "ref_acc": acc_r, "diff": diff,
          "jax_time_s": t_j, "ref_time_s": t_r,
          "speedup": (t_r / t_j) if (t_j and t_r) else None}


def format_table(comparison: dict[str, Any]) -> str:
  """The rows as a fixed-width table."""
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  head = (f"{'attack':<10}{'jax acc':>10}{'ref acc':>10}{'diff':>9}{'jax s':>10}{'ref s':>10}"
          f"{'speedup':>9}")
  lines = [head, "-" * len(head)]
  for r in comparison["rows"]:
    lines.append(f"{r['attack']:<10}{fmt(r['jax_acc'], '.2%'):>10}{fmt(r['ref_acc'], '.2%'):>10}"
                 f"{fmt(r['diff'] and 100 * r['diff'], '+.1f'):>9}"
                 f"{fmt(r['jax_time_s'], '.2f'):>10}{fmt(r['ref_time_s'], '.2f'):>10}"
                 f"{fmt(r['speedup'], '.1f'):>9}")
  lines.append(f"per-point agreement of the final robust flags: "
               f"{comparison['robust_flag_agreement']:.2%}; JAX compile time (excluded above): "
               f"{comparison['jax_compile_s']:.1f} s")
  return "\n".join(lines)
