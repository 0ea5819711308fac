"""The errors a user can cause and fix: each message names the problem, where, and the fix.

Every error raised for bad input (a config field, a data set, a workdir, a checkpoint, a
diverged run) is a :class:`SovrError`. The command-line entry points print such an error as
one message and exit with status 2; anything else is a bug and keeps its traceback. Each
class also derives from the matching built-in (``ValueError``, ``FileNotFoundError``, ...),
so ``except ValueError`` keeps working for library callers.
"""

from __future__ import annotations


class SovrError(Exception):
  """Base of the errors whose message tells the user what to fix."""


class ConfigError(SovrError, ValueError):
  """A config field has an unknown name, a wrong type or an out-of-range value."""


class DataError(SovrError, ValueError):
  """A data set exists but cannot be used as it is (truncated, mislabelled, inconsistent)."""


class DatasetNotFoundError(SovrError, FileNotFoundError):
  """The requested data set is not available locally; the message says how to get it."""


class WorkdirError(SovrError, ValueError):
  """The workdir cannot be used for this run (another run's, a changed config, torn files)."""


class WorkdirLockedError(WorkdirError):
  """Another process is training in the same workdir."""


class CheckpointError(SovrError, RuntimeError):
  """No checkpoint in the workdir could be restored into the current model."""


class TrainingDivergedError(SovrError, FloatingPointError):
  """The loss, the gradients or the parameters became non-finite (or exploded)."""


class MissingDependencyError(SovrError, ImportError):
  """An optional dependency (torch, pyautoattack, ...) is not installed; the message says how
  to install it."""


class NotFoundError(SovrError, FileNotFoundError):
  """A path the user gave does not hold what was asked for (an export, a result file)."""


class InvalidFileError(SovrError, ValueError):
  """A file exists but is not what it should be (another format, a checksum mismatch)."""


class Interrupted(KeyboardInterrupt):
  """The process was stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption); the
  message says what was kept and how to resume. ``exit_status``: 128 + the signal. Like
  KeyboardInterrupt, and unlike a SovrError, no ``except Exception`` catches it (a signal in
  the middle of reading a checkpoint must not make it look corrupt)."""

  def __init__(self, message: str, exit_status: int = 130):
    super().__init__(message)
    self.exit_status = exit_status
