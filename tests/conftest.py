"""Shared fixtures, one persistent JAX compilation cache for the whole test session, and one
OpenMP thread per process.

Most tests compile the same few tiny graphs (configs/tiny.py's train step, its evaluation), in
this process and in the subprocesses that the fault, CLI, multi-host and notebook tests start.
A cache shared through the environment compiles each once: a tiny CLI run falls from ~45 s to
~18 s on two cores. A cache set by the caller (JAX_COMPILATION_CACHE_DIR) is used as it is.
Under pytest-xdist (README's `-n 2`) the worker processes inherit the controller's cache, so
they share it too, and the controller removes it at the end.
"""

import os
import shutil
import tempfile

_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="sovr_jax_tests_jit_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# PyTorch's OpenMP threads spin while they wait, so with more of them than free cores torch
# crawls: the evaluating notebook's AutoAttack cell (both engines, QUICK) took 4 s alone, 82 s
# beside one busy core, and 5 s there with one thread. README's `-n 2` runs two workers on two
# cores, and tests start subprocesses (CLI runs, notebook kernels) beside them. One thread for
# everything of this session, set before any test imports torch and inherited by every
# subprocess; a caller's OMP_NUM_THREADS is used as it is.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # pylint: disable=wrong-import-position

from configs import tiny  # pylint: disable=wrong-import-position
from sovr_jax import experiment  # pylint: disable=wrong-import-position


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
