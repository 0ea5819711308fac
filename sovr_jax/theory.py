"""Numerical check of the margin-growth claim of Kanai et al. (2023), Sec. 4.

On "free logits" (the logits z in R^K of one example are the parameters) under
gradient flow dz/dt = -grad L(z), the logit margin m = z_y - max_{k != y} z_k
grows like

    weighted CE (weight w):  m(t) ~ log(w K t)    (rate 1 in log t)
    OVR:                     m(t) ~ 2 log t       (rate 2 in log t),

so OVR enlarges small margins about twice as fast in log-time. We integrate the
flow in log-time s = log t, where dz/ds = t * dz/dt = -e^s grad L(z) stays
well-conditioned, with classical Runge-Kutta 4, and fit the rate dm/d(log t) on
the late part of the trajectory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sovr_jax import losses

LOSSES = ("ce", "ovr")


def margin_trajectory(loss: str, *, num_classes: int = 10, weight: float = 1.0,
                      log_t0: float = 0.0, log_t1: float = float(np.log(1e6)),
                      num_steps: int = 4000) -> tuple[np.ndarray, np.ndarray]:
  """Margin m(t) of free logits (started at 0) under gradient flow on w * loss.

  Returns:
    (log t, margin) arrays of length num_steps + 1.
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
  if weight <= 0:
    raise ValueError(f"weight must be > 0, got {weight}.")
  label = jnp.zeros((1,), jnp.int32)
  fn = losses.cross_entropy if loss == "ce" else losses.ovr

  def grad(z):
    return jax.grad(lambda z: weight * fn(z[None], label)[0])(z)

  def field(s, z):
    return -jnp.exp(s) * grad(z)

  ds = (log_t1 - log_t0) / num_steps

  def rk4(carry, _):
    s, z = carry
    k1 = field(s, z)
    k2 = field(s + ds / 2, z + ds / 2 * k1)
    k3 = field(s + ds / 2, z + ds / 2 * k2)
    k4 = field(s + ds, z + ds * k3)
    z = z + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return (s + ds, z), losses.logit_margin(z[None], label)[0]

  z0 = jnp.zeros((num_classes,), jnp.float32)
  _, margins = jax.jit(lambda z: jax.lax.scan(rk4, (log_t0, z), None, length=num_steps))(z0)
  log_t = log_t0 + ds * np.arange(num_steps + 1)
  return log_t, np.concatenate([[0.0], np.asarray(margins)])


def log_time_rate(log_t: np.ndarray, margins: np.ndarray, *,
                  fit_from: float = float(np.log(1e3))) -> float:
  """Least-squares slope dm / d(log t) over log t >= fit_from."""
  sel = log_t >= fit_from
  return float(np.polyfit(log_t[sel], margins[sel], 1)[0])


def rate_ratio(*, num_classes: int = 10, weight: float = 1.0) -> dict[str, float]:
  """The OVR and weighted-CE rates and their ratio (expected about 2)."""
  rates = {name: log_time_rate(*margin_trajectory(name, num_classes=num_classes,
                                                  weight=weight if name == "ce" else 1.0))
           for name in LOSSES}
  return {"ovr_rate": rates["ovr"], "ce_rate": rates["ce"],
          "ratio": rates["ovr"] / rates["ce"]}
