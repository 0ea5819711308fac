"""Statistics of the study: margin summaries, and paired comparisons of two methods.

* ``margin_statistics``: the figures docs/results.md quotes for a margin histogram (spread,
  fraction near zero, mean of SOVR's switched set), each with a bootstrap standard error;
  ``margin_peaks``: where the histogram peaks (is it two-peaked?).
* ``mcnemar``: McNemar's exact test on per-point robust flags of two models on the same test
  points (the two-sided binomial test on the discordant pairs).
* ``paired_sign_test``: its generalisation to several seeds evaluated on the same test points,
  exact and clustered by test point (one seed: McNemar's test).
* ``paired_bootstrap``: the difference of two accuracies on the same points with a
  percentile bootstrap interval that resamples test points (each with all of its seeds).

Pooling seeds: every seed evaluates the same test points, and a point that one method holds
and the other loses tends to do so in every seed (how hard a point is belongs to the point).
The seeds' (seed, point) pairs are therefore not independent, and treating them so (McNemar on
the concatenated flags, points resampled within each seed) overstates the evidence up to
sqrt(seeds)-fold in the interval. The pooled test and interval here take the test point as
the unit: three copies of one seed say no more than the seed alone.
* ``mean_std``: mean and sample standard deviation over seeds; ``accuracy_se`` and
  ``difference_se``: the binomial standard errors docs/results.md quotes.

Pure numpy; every function takes arrays and returns plain floats.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: |margin| below this counts as "near zero" (the paper's Figure 1 reading).
NEAR_ZERO = 0.25


def _bootstrap_se(rows: np.ndarray, stat, n_boot: int, seed: int) -> float:
  rng = np.random.default_rng(seed)
  n = len(rows)
  stats = np.asarray([stat(rows[rng.integers(0, n, n)]) for _ in range(n_boot)])
  return float(np.nanstd(stats, ddof=1))


def margin_statistics(margins: Sequence[float], switched: Sequence[bool] | None = None, *,
                      fraction: float = 0.4, near: float = NEAR_ZERO, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, float]:
  """Summary of adversarial logit margins m = z_y - max_{k != y} z_k.

  ``switched``: SOVR's selection replayed on these examples (``margins.json``'s
  "small_margin", ``report.margin_groups``: the ceil(fraction * B) smallest of each batch of
  B); without it, the ``fraction`` smallest of all.

  Returns n, mean, std (ddof 1), near_zero (the fraction with |m| < ``near``) and
  mean_switched (the mean over the switched set), each of the last four with a bootstrap
  standard error ``<name>_se`` (``n_boot`` resamples of the examples). For mean_switched's,
  each resample chooses its own switched set, as many of its smallest as are switched (one
  selection over the resample stands in for the per-batch one): which examples are switched
  depends on the sample too, and flags kept with their margins understate the error by about
  a third (tests/test_stats.py: 0.016 against the 0.023 that fresh samples give).
  """
  m = np.asarray(margins, np.float64)
  if m.ndim != 1 or len(m) < 2:
    raise ValueError(f"margin_statistics needs a 1-D array of at least 2 margins, got {m.shape}.")
  if switched is None:
    k = max(1, math.ceil(fraction * len(m)))
    mean_switched = float(np.mean(np.sort(m)[:k]))
  else:
    flags = np.asarray(switched, bool)
    if flags.shape != m.shape or not flags.any():
      raise ValueError("switched must flag at least one of the margins, in their shape.")
    k, mean_switched = int(flags.sum()), float(np.mean(m[flags]))
  stats = {
      "mean": np.mean,
      "std": lambda v: np.std(v, ddof=1),
      "near_zero": lambda v: np.mean(np.abs(v) < near),
      "mean_switched": lambda v: np.mean(np.partition(v, k - 1)[:k]),
  }
  out: dict[str, float] = {"n": int(len(m)), "switched": k, "near": near}
  for i, (name, fn) in enumerate(stats.items()):
    out[name] = float(fn(m))
    out[f"{name}_se"] = _bootstrap_se(m, fn, n_boot, seed + i)
  out["mean_switched"] = mean_switched  # the switched set itself
  return out


def margin_peaks(margins: Sequence[float], *, min_prominence: float = 0.1,
                 grid: int = 512) -> list[float]:
  """Where the margins' histogram peaks: the local maxima of a Gaussian kernel density
  estimate (Silverman's bandwidth 0.9 min(std, IQR / 1.34) n^(-1/5)) on ``grid`` points
  spanning the 0.5-99.5 percentiles whose prominence (the height above the higher of the two
  lowest points that separate it from a higher peak or the edge) is at least
  ``min_prominence`` of the highest density: a shoulder or a tail ripple is not a peak. The
  paper's Figure 1 reading: PGD-AT's margins are two-peaked, importance weighting collapses
  them to one peak near zero.
  """
  m = np.asarray(margins, np.float64)
  if m.ndim != 1 or len(m) < 10:
    raise ValueError(f"margin_peaks needs a 1-D array of at least 10 margins, got {m.shape}.")
  spread = min(np.std(m, ddof=1), np.subtract(*np.percentile(m, [75, 25])) / 1.34)
  h = 0.9 * (spread if spread > 0 else np.std(m, ddof=1) or 1.0) * len(m) ** -0.2
  g = np.linspace(*np.percentile(m, [0.5, 99.5]), grid)
  dens = np.exp(-0.5 * ((g[:, None] - m[None, :]) / h) ** 2).sum(axis=1)
  peaks = []
  for i in np.flatnonzero((dens[1:-1] > dens[:-2]) & (dens[1:-1] >= dens[2:])) + 1:
    higher = np.flatnonzero(dens > dens[i])
    left = higher[higher < i]
    right = higher[higher > i]
    base_left = dens[(left[-1] if len(left) else 0):i + 1].min()
    base_right = dens[i:(right[0] + 1 if len(right) else grid)].min()
    if dens[i] - max(base_left, base_right) >= min_prominence * dens.max():
      peaks.append(float(g[i]))
  return peaks


def _binom_cdf(k: int, n: int) -> float:
  """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (exact for n in the 10,000s)."""
  if k < 0:
    return 0.0
  if k >= n:
    return 1.0
  logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
          for i in range(k + 1)]
  top = max(logs)
  return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
  """McNemar's exact test of "A and B are equally robust" on the same points.

  a, b: per-point robust flags. Only discordant points count: n_ab (robust under A only) and
  n_ba (under B only); p = min(1, 2 P(X <= min(n_ab, n_ba))), X ~ Bin(n_ab + n_ba, 1/2).
  """
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"mcnemar needs two flag vectors of one length, got {a.shape}, {b.shape}.")
  n_ab, n_ba = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = n_ab + n_ba
  p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_cdf(min(n_ab, n_ba), n))
  return {"n": int(len(a)), "a_only": n_ab, "b_only": n_ba, "p_value": p}


def _flag_pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Two per-point flag arrays of one shape, as [seeds, n] bool."""
  a, b = np.atleast_2d(np.asarray(a, bool)), np.atleast_2d(np.asarray(b, bool))
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"{name} needs flags of one shape ([n] or [seeds, n]), got "
                     f"{a.shape} and {b.shape}.")
  return a, b


def _binom_pmf(n: int) -> np.ndarray:
  """P(X = x), x = 0..n, X ~ Binomial(n, 1/2)."""
  x = np.arange(n + 1)
  logs = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1)
                                          for i in x]) - n * math.log(2))
  return np.exp(logs)


def paired_sign_test(a: Sequence[Sequence[bool]] | Sequence[bool],
                     b: Sequence[Sequence[bool]] | Sequence[bool]) -> dict[str, Any]:
  """Exact two-sided test of "A and B are equally robust" on the same test points, one seed
  ([n] flags) or several ([seeds, n], every seed on the same points).

  Per point i, c_i = sum over seeds of (b_si - a_si), an integer in [-S, S]. Under the null
  the labels A and B are exchangeable at each point (all of its seeds together), so c_i is as
  likely as -c_i, and T = sum_i c_i has the distribution of sum_j j (2 X_j - n_j),
  X_j ~ Bin(n_j, 1/2) independent, n_j the number of points with |c_i| = j; p = P(|T| >= |t|),
  computed exactly. With one seed, n_1 is the number of discordant points and this is
  McNemar's exact test (``mcnemar``). The point is the unit: repeating a seed adds nothing.

  Returns n (points per seed), seeds, a_only and b_only (summed over the seeds), p_value.
  """
  a, b = _flag_pair(a, b, "paired_sign_test")
  c = (b.astype(np.int64) - a.astype(np.int64)).sum(axis=0)
  t = int(c.sum())
  counts = np.bincount(np.abs(c), minlength=a.shape[0] + 1)
  # The pmf of U = sum_j j X_j, built one j at a time; T = 2 U - sum_j j n_j.
  pmf = np.ones(1)
  for j, n_j in enumerate(counts[1:], start=1):
    if n_j:
      binom = _binom_pmf(int(n_j))
      out = np.zeros(len(pmf) + j * int(n_j))
      for x, w in enumerate(binom):
        if w:
          out[j * x:j * x + len(pmf)] += w * pmf
      pmf = out
  shift = int(sum(j * int(n_j) for j, n_j in enumerate(counts) if j))
  big_t = 2 * np.arange(len(pmf)) - shift
  p = 1.0 if t == 0 else float(min(1.0, pmf[np.abs(big_t) >= abs(t)].sum()))
  return {"n": int(a.shape[1]), "seeds": int(a.shape[0]), "a_only": int(np.sum(a & ~b)),
          "b_only": int(np.sum(~a & b)), "p_value": p}


def paired_bootstrap(a: Sequence[Sequence[bool]] | Sequence[bool],
                     b: Sequence[Sequence[bool]] | Sequence[bool], *, n_boot: int = 10000,
                     level: float = 0.95, seed: int = 0) -> dict[str, float]:
  """acc(B) - acc(A) on the same points, with a percentile bootstrap interval.

  a, b: per-point flags of one seed ([n]) or of several seeds ([seeds, n], pooled: the
  difference is the mean over seeds). Each resample draws n test points with replacement,
  each with all of its seeds (a cluster bootstrap: the point is the unit, see the module's
  note on pooling).
  """
  a, b = _flag_pair(a, b, "paired_bootstrap")
  d = (b.astype(np.float64) - a.astype(np.float64)).mean(axis=0)  # per point, over seeds
  n = len(d)
  rng = np.random.default_rng(seed)
  chunks = [min(256, n_boot - i) for i in range(0, n_boot, 256)]  # resamples per draw
  boots = np.concatenate([d[rng.integers(0, n, (m, n))].mean(axis=1) for m in chunks])
  lo, hi = np.percentile(boots, [50 * (1 - level), 50 * (1 + level)])
  return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "level": level,
          "seeds": int(a.shape[0]), "n": int(n)}


def seed_interval(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any] | None:
  """The seed-level view of a difference measured once per seed: mean, std (ddof 1) and the
  Student-t interval on seeds - 1 degrees of freedom, which includes the seed-to-seed
  variation of training that resampling test points (``paired_bootstrap``) leaves out. None
  below two seeds."""
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return None
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  mean, std = float(d.mean()), float(d.std(ddof=1))
  half = float(sps.t.ppf(0.5 + level / 2, d.size - 1)) * std / math.sqrt(d.size)
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "level": level,
          "seeds": int(d.size)}


def format_p(p: float) -> str:
  """A p-value for a table: 3 significant digits, and "< 1e-300" below that (where it
  underflowed to 0 or to a subnormal float)."""
  return "< 1e-300" if p < 1e-300 else f"{p:.3g}"


def accuracy_se(accuracy: float, n: int) -> float:
  """Standard error of an accuracy measured on n independent points: sqrt(p (1 - p) / n)."""
  return math.sqrt(accuracy * (1.0 - accuracy) / n)


def difference_se(accuracy: float, n: int) -> float:
  """Standard error of the difference of two independent runs' accuracies near ``accuracy``
  on n points each (sqrt(2) times ``accuracy_se``); a paired test on the same points is
  tighter (``mcnemar``, ``paired_sign_test``, ``paired_bootstrap``)."""
  return math.sqrt(2.0) * accuracy_se(accuracy, n)


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (None for one value) over seeds."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
          "n": int(len(v))}
