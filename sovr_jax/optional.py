"""Optional dependencies: imported where they are needed, with the install line if missing.

The JAX side (training, evaluation, the JAX AutoAttack) needs none of them; the PyTorch export
and the reference AutoAttack need torch (and pyautoattack), the RobustBench format robustbench.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sovr_jax.errors import MissingDependencyError

INSTALL = {
    "torch": "pip install torch==2.13.0 (the CPU build; on a CUDA or Colab machine keep its "
             "torch)",
    "pyautoattack": "pip install pyautoattack==0.2.0",
    "robustbench": "pip install --no-deps robustbench==1.1.1",
}


def require(*modules: str, purpose: str) -> tuple[ModuleType, ...]:
  """Imports ``modules``, or raises MissingDependencyError naming each missing one, what it
  is needed for, and how to install it (``pip install 'sovr-jax[torch]'`` covers torch and
  pyautoattack)."""
  found, missing = [], []
  for name in modules:
    try:
      found.append(importlib.import_module(name))
    except ImportError:
      missing.append(name)
  if missing:
    how = "; ".join(INSTALL.get(m, f"pip install {m}") for m in missing)
    raise MissingDependencyError(
        f"{purpose} needs {' and '.join(missing)}, which "
        f"{'is' if len(missing) == 1 else 'are'} not installed. Install with: {how}.")
  return tuple(found)
