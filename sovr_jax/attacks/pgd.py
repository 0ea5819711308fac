"""Projected gradient descent (Madry et al., ICLR 2018) as small composable pieces.

An attack is: ``init_delta`` (random start) -> ``num_steps`` x [objective ->
input gradient -> ``ascent_step`` -> ``project``] in a ``jax.lax.fori_loop``,
with the result under ``stop_gradient``. The model enters as a function
``model_fn(x) -> logits``, so the caller chooses how BatchNorm behaves during
the attack (running statistics, or batch statistics without update).

Objectives (maximised, per example; the gradient is of their batch sum, which
equals per-example gradients when examples do not interact):
  * ``"ce"``:     l_CE(z(x'), y)                        (PGD-AT, MART, GAIRAT)
  * ``"kl"``:     KL(p(x) || p(x')), p(x) held fixed    (TRADES)
  * ``"margin"``: max_{k != y} z_k(x') - z_y(x')        (CW-inf, Carlini & Wagner)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from sovr_jax import losses

Array = jax.Array
ModelFn = Callable[[Array], Array]

NORMS = ("linf", "l2")
INITS = ("uniform", "normal", "zero")
OBJECTIVES = ("ce", "kl", "margin")

# TRADES starts its attack at x + 0.001 * N(0, I).
NORMAL_INIT_SCALE = 1e-3


class PGDResult(NamedTuple):
  x_adv: Array            # [N, ...] adversarial inputs (stop_gradient).
  kappa: Array | None     # [N] int32: iterates still classified correctly.


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f"{name} must be one of {valid}, got {value!r}.")


def check_attack_args(*, eps: float, step_size: float, num_steps: int,
                      norm: str = "linf", init: str = "uniform",
                      objective: str = "ce") -> None:
  """Raises ValueError naming the bad argument."""
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}.")
  if step_size < 0:
    raise ValueError(f"step_size must be >= 0, got {step_size}.")
  if num_steps < 0 or int(num_steps) != num_steps:
    raise ValueError(f"num_steps must be a non-negative integer, got {num_steps}.")
  _check_choice("norm", norm, NORMS)
  _check_choice("init", init, INITS)
  _check_choice("objective", objective, OBJECTIVES)


def _per_example_l2(v: Array) -> Array:
  """||v_i||_2 over all non-batch axes, shaped [N, 1, ..., 1] for broadcasting."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def project(x: Array, delta: Array, *, eps: float, norm: str) -> Array:
  """Projects delta onto the eps-ball, then x + delta onto [0, 1]."""
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  elif norm == "l2":
    scale = jnp.minimum(1.0, eps / jnp.maximum(_per_example_l2(delta), 1e-12))
    delta = delta * scale
  else:
    _check_choice("norm", norm, NORMS)
  # Clipping to the box moves every coordinate towards x, so the norm bound holds.
  return jnp.clip(x + delta, 0.0, 1.0) - x


def init_delta(rng: Array, x: Array, *, eps: float, norm: str,
               init: str = "uniform") -> Array:
  """Random start: uniform in the eps-ball, 0.001 * N(0, I) (TRADES), or zero; projected
  at once onto the ball and the [0, 1] box (the TRADES and MAIL code clip only after the
  first step: the start differs by the few pixels it pushes out of [0, 1])."""
  _check_choice("init", init, INITS)
  if init == "zero":
    delta = jnp.zeros_like(x)
  elif init == "normal":
    delta = NORMAL_INIT_SCALE * jax.random.normal(rng, x.shape, x.dtype)
  elif norm == "linf":
    delta = jax.random.uniform(rng, x.shape, x.dtype, -eps, eps)
  else:  # Uniform in the L2 ball: Gaussian direction, radius eps * u^(1/d).
    dir_rng, rad_rng = jax.random.split(rng)
    direction = jax.random.normal(dir_rng, x.shape, x.dtype)
    direction = direction / jnp.maximum(_per_example_l2(direction), 1e-12)
    dim = x[0].size
    u = jax.random.uniform(rad_rng, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    delta = eps * u ** (1.0 / dim) * direction
  return project(x, delta, eps=eps, norm=norm)


def ascent_step(delta: Array, grad: Array, *, step_size: float, norm: str) -> Array:
  """Steepest ascent for the norm: sign gradient (L-inf), unit gradient (L2)."""
  if norm == "linf":
    return delta + step_size * jnp.sign(grad)
  return delta + step_size * grad / jnp.maximum(_per_example_l2(grad), 1e-12)


def objective_fn(objective: str) -> Callable[[Array, Array, Array | None], Array]:
  """Per-example objective(logits, labels, clean_logits) to maximise."""
  _check_choice("objective", objective, OBJECTIVES)
  if objective == "ce":
    return lambda logits, labels, clean: losses.cross_entropy(logits, labels)
  if objective == "margin":
    return lambda logits, labels, clean: -losses.logit_margin(logits, labels)

  def kl(logits, labels, clean_logits):
    del labels
    return losses.kl_divergence(jax.lax.stop_gradient(clean_logits), logits)
  return kl


def pgd(model_fn: ModelFn, x: Array, labels: Array, rng: Array, *,
        eps: float, step_size: float, num_steps: int, norm: str = "linf",
        objective: str = "ce", init: str = "uniform",
        clean_logits: Array | None = None,
        return_kappa: bool = False) -> PGDResult:
  """PGD attack within the eps-ball (L-inf or L2) intersected with [0, 1].

  x'_0 = Proj(x + delta_0),  x'_{t+1} = Proj(x'_t + alpha * s(grad L(x'_t))),
  with s = sign for L-inf and grad / ||grad||_2 for L2.

  Args:
    model_fn: x -> logits [N, K].
    x: clean inputs in [0, 1], [N, ...].
    labels: int labels [N].
    rng: key for the random start.
    eps, step_size, num_steps: radius, step alpha and number K of steps.
    norm: "linf" or "l2".
    objective: "ce", "kl" (needs ``clean_logits``) or "margin".
    init: "uniform" (in the ball), "normal" (0.001 * N(0, I)) or "zero".
    clean_logits: logits on x, for the "kl" objective (computed if None).
    return_kappa: also count, per example, the iterates x'_0 .. x'_{K-1}
      (those whose gradient is taken) that the model classifies correctly, as
      GAIRAT's ``GA_PGD`` does.

  Returns:
    PGDResult(x_adv, kappa or None), under stop_gradient.
  """
  check_attack_args(eps=eps, step_size=step_size, num_steps=num_steps,
                    norm=norm, init=init, objective=objective)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix((x, labels), 1)
  x = jax.lax.stop_gradient(x)
  if objective == "kl" and clean_logits is None:
    clean_logits = model_fn(x)
  if clean_logits is not None:
    clean_logits = jax.lax.stop_gradient(clean_logits)
  loss_fn = objective_fn(objective)

  def total_objective(delta):
    logits = model_fn(x + delta)
    return jnp.sum(loss_fn(logits, labels, clean_logits)), logits

  grad_fn = jax.grad(total_objective, has_aux=True)

  def body(_, carry):
    delta, kappa = carry
    grad, logits = grad_fn(delta)
    kappa = kappa + (jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
    delta = ascent_step(delta, grad, step_size=step_size, norm=norm)
    return project(x, delta, eps=eps, norm=norm), kappa

  delta0 = init_delta(rng, x, eps=eps, norm=norm, init=init)
  kappa0 = jnp.zeros(labels.shape, jnp.int32)
  delta, kappa = jax.lax.fori_loop(0, num_steps, body, (delta0, kappa0))
  # The final clip only removes float round-off of x + (clip(x + d) - x).
  x_adv = jax.lax.stop_gradient(jnp.clip(x + delta, 0.0, 1.0))
  return PGDResult(x_adv, kappa if return_kappa else None)
