"""What the command-line entry points share: a known error is one message and exit status 2.

A :class:`sovr_jax.errors.SovrError` (a bad config field, a missing data set, a workdir in
use, an unreadable checkpoint, a diverged run) is printed as ``error: <message>`` on stderr;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from sovr_jax.errors import SovrError

EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with SovrError turned into ``error: ...`` and exit status 2."""

  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except SovrError as e:
      fail(str(e))
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
    except (OSError, ValueError, ImportError) as e:  # a config file that cannot be loaded
      missing = re.search(r"No such file or directory: '([^']+)'", str(e))
      if missing:
        fail(f"--config: no config file {missing.group(1)!r} (a path relative to "
             f"{os.getcwd()}; the repository's are in configs/).")
      fail(f"--config: {_last_line(str(e))}")
  return parse
