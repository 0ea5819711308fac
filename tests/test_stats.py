"""sovr_jax.stats against formulas, and the figures docs/results.md quotes against the code."""

import json
import math
import os

import numpy as np
import pytest

from sovr_jax import study_report
from sovr_jax import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_margin_statistics_against_formulas():
  rng = np.random.default_rng(0)
  m = rng.normal(0.3, 1.2, 4000)
  switched = m < np.quantile(m, 0.4)
  s = stats.margin_statistics(m, switched, n_boot=300)
  assert s["n"] == 4000 and s["switched"] == switched.sum()
  assert s["mean"] == pytest.approx(m.mean())
  assert s["std"] == pytest.approx(np.std(m, ddof=1))
  assert s["near_zero"] == pytest.approx(np.mean(np.abs(m) < 0.25))
  assert s["mean_switched"] == pytest.approx(m[switched].mean())
  # Bootstrap standard errors against the analytic ones.
  assert s["mean_se"] == pytest.approx(1.2 / math.sqrt(4000), rel=0.15)
  p = s["near_zero"]
  assert s["near_zero_se"] == pytest.approx(math.sqrt(p * (1 - p) / 4000), rel=0.15)
  assert s["std_se"] == pytest.approx(1.2 / math.sqrt(2 * 3999), rel=0.2)
  # Without flags, the 40 % smallest of all.
  s2 = stats.margin_statistics(m, n_boot=500)
  assert s2["mean_switched"] == pytest.approx(np.sort(m)[:1600].mean())
  # Its standard error against the spread over fresh samples of the same law, with and
  # without the flags: the switched set is chosen again in each resample (kept fixed, the
  # bootstrap said 0.016 against 0.023).
  fresh = [np.sort(rng.normal(0.3, 1.2, 4000))[:1600].mean() for _ in range(400)]
  for got in (s2, s):
    assert got["mean_switched_se"] == pytest.approx(np.std(fresh, ddof=1), rel=0.15)
  with pytest.raises(ValueError):
    stats.margin_statistics([1.0])


def test_margin_peaks_count_peaks_not_shoulders():
  rng = np.random.default_rng(4)
  two = stats.margin_peaks(np.r_[rng.normal(-2.0, 0.6, 800), rng.normal(1.5, 0.8, 1200)])
  assert len(two) == 2 and abs(two[0] + 2.0) < 0.3 and abs(two[1] - 1.5) < 0.3
  assert len(stats.margin_peaks(rng.normal(0.0, 1.0, 2000))) == 1
  # A flat shoulder (a tenth of the points spread wide) is not a second peak...
  shoulder = np.r_[rng.normal(-0.5, 0.3, 1800), rng.uniform(0.0, 2.0, 200)]
  assert len(stats.margin_peaks(shoulder)) == 1
  # ...a small but distinct cluster is.
  assert len(stats.margin_peaks(np.r_[rng.normal(0, 1, 1800), rng.normal(3, 0.3, 200)])) == 2
  with pytest.raises(ValueError):
    stats.margin_peaks([0.0, 1.0])


def test_mcnemar_exact_values():
  a = np.array([True] * 10 + [False] * 2 + [True] * 50 + [False] * 38)
  b = np.array([False] * 10 + [True] * 2 + [True] * 50 + [False] * 38)
  r = stats.mcnemar(a, b)
  assert (r["a_only"], r["b_only"], r["n"]) == (10, 2, 100)
  assert r["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 P(Bin(12, 1/2) <= 2)
  assert stats.mcnemar(a, a)["p_value"] == 1.0
  # Large counts: the normal approximation with continuity correction agrees.
  rng = np.random.default_rng(1)
  a = rng.random(10000) < 0.5
  b = a.copy()
  flip = rng.random(10000) < 0.1
  b[flip & a] = rng.random((flip & a).sum()) < 0.4
  r = stats.mcnemar(a, b)
  n1, n2 = r["a_only"], r["b_only"]
  z = (abs(n1 - n2) - 1) / math.sqrt(n1 + n2)
  assert r["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)


def test_paired_sign_test_is_mcnemar_for_one_seed_and_counts_the_point_once_pooled():
  rng = np.random.default_rng(3)
  a = rng.random(3000) < 0.45
  b = a.copy()
  flip = rng.random(3000) < 0.08
  b[flip] = rng.random(flip.sum()) < 0.6
  one = stats.paired_sign_test(a, b)
  assert one["p_value"] == pytest.approx(stats.mcnemar(a, b)["p_value"], rel=1e-9)
  assert (one["a_only"], one["b_only"], one["seeds"]) == (
      stats.mcnemar(a, b)["a_only"], stats.mcnemar(a, b)["b_only"], 1)
  # Three copies of one seed are no more evidence than the seed: the same p-value, where
  # McNemar on the concatenated (seed, point) pairs would claim far more.
  three = stats.paired_sign_test(np.stack([a] * 3), np.stack([b] * 3))
  assert three["p_value"] == pytest.approx(one["p_value"], rel=1e-9)
  assert stats.mcnemar(np.tile(a, 3), np.tile(b, 3))["p_value"] < one["p_value"] / 10
  assert stats.paired_sign_test(np.stack([a, a]), np.stack([a, a]))["p_value"] == 1.0
  # Exact on a hand count: per-point sums c = (+2, +1, -1) over two seeds. T = 2; under the
  # null T = 2 s1 + s2 + s3 (signs +-1, 8 outcomes); |T| >= 2 in 6 of them.
  fa = np.array([[0, 0, 0], [0, 0, 1]], bool)
  fb = np.array([[1, 1, 0], [1, 0, 0]], bool)
  assert stats.paired_sign_test(fa, fb)["p_value"] == pytest.approx(6 / 8)
  # Independent seeds with a real effect: more seeds, more evidence.
  a3 = rng.random((3, 3000)) < 0.45
  b3 = a3 | (rng.random((3, 3000)) < 0.01)
  assert stats.paired_sign_test(a3, b3)["p_value"] < min(
      stats.paired_sign_test(a3[i], b3[i])["p_value"] for i in range(3))
  with pytest.raises(ValueError, match="one shape"):
    stats.paired_sign_test(a, b[:10])


def test_paired_bootstrap_interval():
  rng = np.random.default_rng(2)
  a = rng.random(5000) < 0.45
  b = a | (rng.random(5000) < 0.04)  # B is robust wherever A is, and on ~2 % more points
  r = stats.paired_bootstrap(a, b, n_boot=2000)
  assert r["diff"] == pytest.approx(b.mean() - a.mean())
  assert 0 < r["low"] < r["diff"] < r["high"]
  # The paired interval is narrower than an unpaired one would be.
  assert r["high"] - r["low"] < 2 * 1.96 * stats.difference_se(0.45, 5000)
  pooled = stats.paired_bootstrap(np.stack([a, a]), np.stack([b, a]), n_boot=500)
  assert pooled["seeds"] == 2 and pooled["diff"] == pytest.approx((b.mean() - a.mean()) / 2)
  # Pooled, a test point is resampled with all of its seeds: three copies of one seed give
  # the seed's own interval (the same draws), not one sqrt(3) times narrower.
  copies = stats.paired_bootstrap(np.stack([a] * 3), np.stack([b] * 3), n_boot=2000)
  assert (copies["low"], copies["high"]) == pytest.approx((r["low"], r["high"]))
  same = stats.paired_bootstrap(a, a, n_boot=100)
  assert same["low"] == same["high"] == 0.0


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_paired_bootstrap_interval_has_its_level(level):
  """At n = 5000 the mean difference is nearly normal: the percentile interval is the normal
  one, diff +- z sd(d) / sqrt(n), to a few percent of its width (an 80 % interval sold as a
  95 % one is 35 % narrower; a 95 % one sold as 90 %, 19 % wider)."""
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  a = rng.random(5000) < 0.45
  b = a | (rng.random(5000) < 0.04)
  d = b.astype(np.float64) - a
  se = d.std(ddof=1) / np.sqrt(len(d))
  r = stats.paired_bootstrap(a, b, level=level)
  assert r["level"] == level
  assert (r["high"] - r["low"]) / 2 == pytest.approx(sps.norm.ppf(0.5 + level / 2) * se,
                                                     rel=0.05)
  assert (r["high"] + r["low"]) / 2 == pytest.approx(r["diff"], abs=0.25 * se)


def test_standard_errors_quoted_in_results_md():
  # "The standard error of an accuracy near 33 % on 1,000 points is 1.5 points."
  assert round(100 * stats.accuracy_se(0.33, 1000), 1) == 1.5
  # "near 23 % on 500 points is 1.9 points"; "of a difference ... about 2.7 points".
  assert round(100 * stats.accuracy_se(0.23, 500), 1) == 1.9
  assert round(100 * stats.difference_se(0.23, 500), 1) == 2.7
  assert stats.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}


@pytest.mark.parametrize("scale", ["gpu", "cpu"])
def test_margin_tables_in_results_md_come_from_the_code(scale):
  with open(os.path.join(REPO, "results", f"study_{scale}.json")) as f:
    study = json.load(f)
  with open(os.path.join(REPO, "docs", "results.md")) as f:
    doc = f.read()
  for row in study_report.margin_table(study).splitlines()[2:]:
    cells = [c.strip() for c in row.strip("|").split("|")]
    if "rho" in cells[0]:
      continue  # the sweep runs are in results/study_cpu_table.md only
    quoted = f"| {cells[0]} | {' | '.join(cells[2:])} |"
    assert quoted in doc, quoted
