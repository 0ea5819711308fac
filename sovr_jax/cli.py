"""What the command-line entry points share: a known error is one message and exit status 2.

A :class:`sovr_jax.errors.SovrError` (a bad config field, a missing data set, a workdir in
use, an unreadable checkpoint, a diverged run) is printed as ``error: <message>`` on stderr;
so is a file that cannot be written (a full disk, a read-only folder). SIGINT (Ctrl-C) and
SIGTERM (a scheduler's preemption) stop a command with one line and status 128 + the signal;
``finally`` blocks run first (the workdir's lock is released). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

from sovr_jax import signals
from sovr_jax.errors import Interrupted, SovrError

EXIT_USER_ERROR = 2
#: OSError numbers that mean "this path cannot be written here", not a bug.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "a read-only file "
                 "system", errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def write_error(e: OSError) -> str | None:
  """One message for an OSError that means a path cannot be written, else None."""
  reason = _WRITE_ERRNOS.get(e.errno)
  if reason is None:
    return None
  where = f" {e.filename}" if e.filename else ""
  return (f"cannot write{where}: {reason}. Free space, or pass a writable --workdir / --out; "
          f"a training run resumes from its newest checkpoint when the same command runs "
          f"again.")


def _finish_device_work() -> None:
  """Waits for the computations and host copies that a signal's exception left in flight.

  The exception can land between ``jax.device_get``'s start of the copies and its wait for
  them; a copy that completes while Python shuts down needs the interpreter, and jax 0.11.2
  then aborted the process ("terminate called without an active exception", status -6
  instead of 128 + the signal; seen on this CPU with the GPU machine's versions). Reading
  every live array to the host waits for those copies (and costs one copy of what is on the
  device, at a stop only)."""
  jax = sys.modules.get("jax")
  if jax is None:
    return
  for a in jax.live_arrays():
    try:
      if not a.is_deleted():
        a.block_until_ready()
        if a.is_fully_addressable:
          a.__array__()
    except Exception:  # pylint: disable=broad-except  # a failed computation: nothing pending
      pass


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with SovrError and unwritable paths turned into ``error: ...`` and exit status 2,
  and SIGINT / SIGTERM into one line and status 130 / 143."""

  def wrapper(*args, **kwargs):
    main_thread = threading.current_thread() is threading.main_thread()  # signals: main only
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.getsignal(s) for s in stops]
    previous_hook = sys.unraisablehook
    if main_thread:
      signals.clear()
      for s in stops:
        signal.signal(s, signals.handle)
      sys.unraisablehook = signals.unraisable_hook(previous_hook)
    try:
      result = fn(*args, **kwargs)
      signals.raise_if_stopped()  # a signal that a finalizer swallowed after the last check
      return result
    except Interrupted as e:
      _finish_device_work()
      fail(str(e), e.exit_status)
    except KeyboardInterrupt:
      _finish_device_work()
      e = signals.interrupted(signal.SIGINT)  # a SIGINT not through our handler
      fail(str(e), e.exit_status)
    except SovrError as e:
      fail(str(e))
    except OSError as e:
      message = write_error(e)
      if message is None:
        raise
      fail(message)
    finally:
      if main_thread:
        for s, handler in zip(stops, previous):
          signal.signal(s, handler)
        sys.unraisablehook = previous_hook
        signals.clear()
  wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
  return wrapper


def _last_line(text: str) -> str:
  """The message at the bottom of a traceback-bearing error text (ml_collections embeds the
  config file's traceback in its own error), on one line."""
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  if "Traceback (most recent call last):" in text and lines:
    return lines[-1]
  return " ".join(lines)


_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=|$)")


def config_flags_parser(flag_values) -> Callable[[Sequence[str]], list[str]]:
  """An absl ``flags_parser`` that turns the errors of ``--config`` (a missing or failing
  config file) and of ``--config.<field>=...`` overrides (an unknown field, a bad value) into
  one message naming the flag, the valid fields, and the fix."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from sovr_jax import config_lib  # pylint: disable=import-outside-toplevel

  def parse(argv: Sequence[str]) -> list[str]:
    try:
      rest = flag_values(argv)
      if "config" in flag_values and flag_values["config"].present:
        flag_values.config.keys()  # a config file that failed to load raises here
      if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]}: everything is a flag, e.g. "
             f"--config.train.epochs=5 (run with --helpshort for the flags).")
      return rest
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
      schema = config_lib.default_schema()
      for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if m and m.group(1) not in config_lib.leaves(schema):
          fail(config_lib.unknown_field_message(m.group(1), schema))
      fail(f"a --config.<field> override failed: {e}")
    except flags.Error as e:
      fail(f"{_last_line(str(e.__cause__ or e))} (run with --helpshort for the flags)")
    # A config file that cannot be loaded (missing, failing, or not Python).
    except (OSError, ValueError, ImportError, SyntaxError, NameError) as e:
      missing = re.search(r"No such file or directory: '([^']+)'", str(e))
      if missing:
        fail(f"--config: no config file {missing.group(1)!r} (a path relative to "
             f"{os.getcwd()}; the repository's are in configs/).")
      fail(f"--config: {_last_line(str(e))}")
  return parse
