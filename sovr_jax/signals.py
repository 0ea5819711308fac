"""Stop signals that the handler's exception could not deliver.

:func:`sovr_jax.cli.guarded` turns SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) into
:class:`sovr_jax.errors.Interrupted`, raised in the main thread at its next bytecode. When that
bytecode runs in a finalizer or in a callback from C (Orbax and tensorstore run both around a
checkpoint save), Python prints the exception as "Exception ignored" and goes on: in a
clean-clone run of ``.ci/run`` (2026-12-03) a training run that got SIGINT just after its
first checkpoint trained to its end and exited 0. So the handler also records the signal
here, and the training loop calls :func:`raise_if_stopped` after each dispatch. The record is
process-wide, as signals are.
"""

from __future__ import annotations

import signal

from sovr_jax.errors import Interrupted

_received: list[int] = []


def interrupted(signum: int) -> Interrupted:
  """The exception for ``signum``: status 128 + the signal, a message naming it."""
  if signum == signal.SIGINT:
    return Interrupted("interrupted (SIGINT).", 128 + signum)
  return Interrupted(f"stopped by {signal.Signals(signum).name}.", 128 + signum)


def handle(signum: int, frame) -> None:
  """A signal handler: records ``signum`` and raises its :func:`interrupted`."""
  del frame
  _received.append(signum)
  raise interrupted(signum)


def clear() -> None:
  _received.clear()


def raise_if_stopped() -> None:
  """Raises the first recorded signal's exception again, if one was recorded."""
  if _received:
    raise interrupted(_received[0])


def unraisable_hook(previous):
  """A ``sys.unraisablehook`` that drops the exception of a recorded stop signal (a finalizer
  or a callback from C swallowed it, and Python would print it as "Exception ignored" with a
  traceback; :func:`raise_if_stopped` raises it again) and passes anything else to
  ``previous``."""

  def hook(unraisable) -> None:
    if isinstance(unraisable.exc_value, Interrupted) and _received:
      return
    previous(unraisable)
  return hook
