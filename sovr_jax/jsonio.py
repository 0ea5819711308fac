"""Writing JSON results so that a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def to_jsonable(o: Any) -> Any:
  """``json.dump`` default for numpy scalars and arrays (anything else: ``str``)."""
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` through a temporary file and ``os.replace``."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=to_jsonable)
    f.write("\n")
  os.replace(tmp, path)
