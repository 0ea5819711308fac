"""The margin-growth claim of method.md: OVR's log-time rate is about twice CE's."""

import numpy as np
import pytest

from sovr_jax import theory


@pytest.mark.parametrize("weight", [0.2, 1.0, 3.0])
def test_ovr_grows_margin_twice_as_fast_as_weighted_ce(weight):
  r = theory.rate_ratio(weight=weight)
  assert 1.8 <= r["ratio"] <= 2.2, r
  assert 1.9 <= r["ovr_rate"] <= 2.1
  assert 0.9 <= r["ce_rate"] <= 1.1


def test_closed_forms():
  log_t, m_ce = theory.margin_trajectory("ce", num_classes=10, weight=2.0)
  # m ~ log(w K t) for weighted CE, m ~ 2 log t for OVR, at t = 1e6.
  np.testing.assert_allclose(m_ce[-1], np.log(2.0 * 10 * np.exp(log_t[-1])), rtol=0.01)
  log_t, m_ovr = theory.margin_trajectory("ovr", num_classes=10)
  np.testing.assert_allclose(m_ovr[-1], 2 * log_t[-1], rtol=0.01)
  assert np.all(np.diff(m_ovr) > 0) and np.all(np.diff(m_ce) > 0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="loss"):
    theory.margin_trajectory("mse")
  with pytest.raises(ValueError, match="weight"):
    theory.margin_trajectory("ce", weight=0.0)
