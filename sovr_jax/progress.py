"""Progress bars for the long host-side loops (data decoding, TFDS reads), on process 0."""

from __future__ import annotations

import sys


class Progress:
  """A tqdm bar on stderr (process 0 only; silent where tqdm is disabled)."""

  def __init__(self, desc: str, total: int | None = None, unit: str = "it"):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    quiet = process_index() != 0
    self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=2.0,
                     disable=quiet)

  def update(self, k: int = 1) -> None:
    self._bar.update(k)

  def wrap(self, it, step: int):
    for i in it:
      yield i
      self._bar.update(step)
    self.close()

  def close(self) -> None:
    self._bar.close()


def process_index() -> int:
  jax = sys.modules.get("jax")  # no import: data loading does not need jax
  return jax.process_index() if jax is not None else 0
