"""Writing result files: strict JSON (no NaN tokens), never a half-written file, and the
checksum recorded beside exported weights."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Iterable

import numpy as np

from sovr_jax.errors import InvalidFileError, NotFoundError


def sha256(path: str) -> str:
  """The SHA-256 of a file, read in 1 MiB chunks (recorded next to exported weights)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_json_in(path: str, file_name: str, missing: str) -> tuple[str, Any]:
  """(JSON path, contents) of ``file_name`` in directory ``path``, or of ``path`` itself.

  A missing file raises NotFoundError ending in the hint ``missing`` (what to run to make it);
  a file that is not JSON raises InvalidFileError naming it.
  """
  json_path = os.path.join(path, file_name) if os.path.isdir(path) else path
  if not os.path.exists(json_path):
    raise NotFoundError(f"No {file_name} at {path!r} ({json_path} not found). {missing}")
  try:
    with open(json_path) as f:
      return json_path, json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InvalidFileError(f"{json_path} is not valid JSON ({e}); it was cut short or "
                           f"overwritten. {missing}") from None


def to_jsonable(o: Any) -> Any:
  """A JSON value for ``o``: numpy scalars and arrays as Python numbers and lists, tuples as
  lists, non-finite floats as None (strict JSON has no NaN or Infinity), anything else
  unknown as ``str``."""
  if isinstance(o, dict):
    return {str(k): to_jsonable(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [to_jsonable(v) for v in o]
  if isinstance(o, np.ndarray):
    return to_jsonable(o.tolist())
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    o = o.item()
  if isinstance(o, float):
    return o if math.isfinite(o) else None
  if o is None or isinstance(o, (str, int, bool)):
    return o
  if hasattr(o, "__array__") and hasattr(o, "shape"):  # jax arrays
    return to_jsonable(np.asarray(o))
  return str(o)


def dumps(obj: Any, **kwargs) -> str:
  return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict JSON to ``path`` through a temporary file and ``os.replace``."""
  _write_atomic(path, dumps(obj, indent=1) + "\n")


def write_jsonl_atomic(path: str, records: Iterable[Any]) -> None:
  """Rewrites a JSON-lines file atomically."""
  _write_atomic(path, "".join(dumps(r) + "\n" for r in records))


def append_jsonl(path: str, record: Any) -> None:
  """Appends one strict-JSON line (a crash can tear only this line, which readers skip)."""
  with open(path, "a") as f:
    f.write(dumps(record) + "\n")
    f.flush()
