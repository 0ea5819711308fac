"""AutoAttack's settings, the same for both engines, and the parsing of what a user types.

The standard version (Croce & Hein, ICML 2020; fra31/auto-attack ``version='standard'``):
APGD-CE (1 restart), APGD-T (9 target classes, 1 restart each), FAB-T (9 target classes,
1 restart), Square (5,000 queries, 1 restart), all with 100 iterations; target classes are
capped at K - 1 for K classes. A custom attack list runs with these settings too (the
reference's ``version='custom'`` would otherwise keep its constructor defaults, e.g. 5
APGD-CE restarts).
"""

from __future__ import annotations

import dataclasses
import math

from sovr_jax.attacks.autoattack.ensemble import ATTACKS, STANDARD_ATTACKS
from sovr_jax.errors import ConfigError

NORMS = ("linf", "l2")
#: The reference's spelling of the norms (pyautoattack's ``norm=``).
REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The knobs of every attack (the standard version's values by default; lower them only for
  quick checks, and say so)."""

  n_iter: int = 100          # APGD / FAB iterations
  n_queries: int = 5000      # Square queries
  n_target_classes: int = 9  # APGD-T / FAB-T targets (capped at K - 1)
  n_restarts: int = 1        # APGD-CE / APGD-DLR / FAB restarts

  def for_classes(self, num_classes: int) -> "Settings":
    return dataclasses.replace(
        self, n_target_classes=max(1, min(self.n_target_classes, num_classes - 1)))

  @property
  def is_standard(self) -> bool:
    return self == Settings(n_target_classes=self.n_target_classes)


#: Reduced settings for quick checks (tests, --fast).
FAST = Settings(n_iter=20, n_queries=300)


def parse_eps(text: str | float) -> float:
  """A float or a fraction such as ``8/255``."""
  s = str(text).strip()
  try:
    if "/" in s:
      num, den = s.split("/", 1)
      value = float(num) / float(den)
    else:
      value = float(s)
  except (ValueError, ZeroDivisionError) as e:
    raise ConfigError(f"Cannot read eps {text!r}; give a number such as 0.0314 or 8/255.") from e
  if not math.isfinite(value):
    raise ConfigError(f"eps must be finite, got {text!r}.")
  return value


def check_eps(eps: float, norm: str) -> None:
  """Refuses eps <= 0 and, for L-inf, eps > 1 (pixel units instead of [0, 1] units)."""
  if norm not in NORMS:
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}.")
  if not eps > 0:
    raise ConfigError(f"eps must be > 0, got {eps}.")
  if norm == "linf" and eps > 1:
    raise ConfigError(f"eps={eps:g} is larger than the [0, 1] image range (AutoAttack's "
                      f"inputs); did you mean --eps {eps:g}/255 (= {eps / 255:.6f})?")


def parse_attacks(text: str | None) -> tuple[str, ...]:
  """'apgd-ce,apgd-t' -> ('apgd-ce', 'apgd-t'); None or '' -> the standard four."""
  if not text:
    return STANDARD_ATTACKS
  names = [a.strip().lower() for a in str(text).split(",") if a.strip()]
  bad = [a for a in names if a not in ATTACKS]
  if not names or bad:
    raise ConfigError(f"--attacks {text!r}: unknown or empty attack list ({bad or 'empty'}); "
                      f"valid attacks: {', '.join(ATTACKS)} (comma-separated).")
  if len(set(names)) != len(names):
    raise ConfigError(f"--attacks {text!r} names an attack twice.")
  return tuple(names)


def version(attacks: tuple[str, ...], settings: Settings) -> str:
  """'standard' for the standard four with standard settings, else 'custom'."""
  return "standard" if tuple(attacks) == STANDARD_ATTACKS and settings.is_standard else "custom"
