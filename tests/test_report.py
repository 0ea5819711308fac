"""The report's margin sample and SOVR's selection replayed on it (sovr_jax.report)."""

import numpy as np

from sovr_jax import report


def test_margin_sample_mixes_the_classes_of_a_class_ordered_split():
  """CIFAR-10's training split is ordered by class: its first 2,000 examples are airplanes.
  The sample holds every class in about its share, in an order whose batches mix them."""
  labels = np.repeat(np.arange(10), 4900)
  idx = report.margin_sample(len(labels), 2000, seed=0)
  assert len(set(idx.tolist())) == 2000 and idx.max() < len(labels)
  counts = np.bincount(labels[idx], minlength=10)
  assert counts.min() > 150 and counts.max() < 250, counts
  assert len(set(labels[idx[:128]].tolist())) == 10  # a batch-sized run of it mixes them
  np.testing.assert_array_equal(idx, report.margin_sample(len(labels), 2000, seed=0))
  assert not np.array_equal(idx, report.margin_sample(len(labels), 2000, seed=1))


def test_margin_groups_select_the_smallest_fraction_per_batch():
  margins = np.array([3.0, -1.0, 0.5, 2.0, -2.0, 1.0, 0.0])
  small = report.margin_groups(margins, batch_size=4, fraction=0.5)
  # batch [3, -1, 0.5, 2]: the 2 smallest; batch [-2, 1, 0]: ceil(1.5) = 2 smallest
  np.testing.assert_array_equal(small, [False, True, True, False, True, False, True])
