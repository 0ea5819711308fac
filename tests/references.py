"""The independent references the tests compare against, each optional.

PyTorch (the exported twins, the authors' loss code), pyautoattack (the reference AutoAttack)
and RobustBench's architecture files are what the JAX side is checked against, but the JAX side
runs without them (a TPU runtime; a Python for which no CPU torch wheel is at hand). So a test
that needs one says so (``@needs("torch")``, or ``skip_module_without("torch")`` before a
module's own imports of it) and is skipped, with the install line, where it is missing; the
JAX-only tests still run.

CI installs all three and sets ``SOVR_TESTS_REQUIRE_REFERENCES=1``: there a missing torch or
pyautoattack is an error at collection, never a skip (tests/test_robustbench_export.py fails on
its own without RobustBench).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from sovr_jax import optional

REQUIRE = bool(os.environ.get("SOVR_TESTS_REQUIRE_REFERENCES"))


def _missing(names: tuple[str, ...]) -> str | None:
  """None when every module is importable, else why not and how to install them."""
  absent = [n for n in names if importlib.util.find_spec(n) is None]
  if not absent:
    return None
  why = (f"needs {' and '.join(absent)}, not installed "
         f"({'; '.join(optional.INSTALL.get(n, f'pip install {n}') for n in absent)})")
  if REQUIRE:
    raise RuntimeError(f"SOVR_TESTS_REQUIRE_REFERENCES is set and a test {why}.")
  return why


def needs(*names: str) -> pytest.MarkDecorator:
  """A mark that skips the test where one of the modules ``names`` is missing."""
  why = _missing(names)
  return pytest.mark.skipif(why is not None, reason=why or "")


def skip_module_without(*names: str) -> None:
  """Skips the whole calling test module where one of ``names`` is missing; call it before
  the module imports them."""
  why = _missing(names)
  if why is not None:
    pytest.skip(why, allow_module_level=True)


def have(*names: str) -> bool:
  """Whether every module ``names`` is importable (under SOVR_TESTS_REQUIRE_REFERENCES a
  missing one raises instead)."""
  return _missing(names) is None
