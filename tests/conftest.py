"""Shared fixtures."""

import pytest

from configs import tiny
from sovr_jax import experiment


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> str:
  """configs/tiny.py trained for one epoch, once per pytest session. 'standard' training on
  1024 digits: SOVR's 8 steps of the default tiny config leave a constant predictor, which
  would make label checks vacuous."""
  workdir = tmp_path_factory.mktemp("trained_tiny_run")
  cfg = tiny.get_config("standard")
  cfg.train.epochs = 1
  cfg.data.num_train = 1024
  experiment.train_and_evaluate(cfg, str(workdir))
  return str(workdir)
