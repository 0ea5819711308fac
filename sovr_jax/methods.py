"""Training methods: which attack each one runs and which loss it minimises.

A method is described by a ``MethodSpec`` (what the train step must compute)
and a loss function ``method_loss(name, cfg, outputs, ...)`` that maps the
adversarial/clean logits (and GAIRAT's kappa) to per-example losses. The
formulas live in ``sovr_jax.losses``; see ../shared/docs/method.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sovr_jax import losses

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  description: str
  attack_objective: str | None     # None: no attack (standard training).
  # The attack's start when attack.init == "auto": the authors' own. TRADES, MART and MAIL
  # (mart_loss, mail_loss: x + 0.001 * randn) start at "normal"; PGD-AT (Madry et al.) and
  # GAIRAT (GA_PGD, rand_init=True) uniformly in the ball; SOVR and OVR, whose code was not
  # released, as PGD-AT (our choice).
  default_init: str = "uniform"
  clean_forward: bool = False      # the loss needs clean logits with gradient.
  needs_kappa: bool = False        # GAIRAT's count of correct attack iterates.


METHODS: dict[str, MethodSpec] = {
    "standard": MethodSpec("Clean cross-entropy, no attack (the non-robust baseline).", None),
    "pgd_at": MethodSpec("PGD-AT (Madry et al. 2018): CE on PGD examples.", "ce"),
    "sovr": MethodSpec("SOVR (Kanai et al. 2023): OVR on the smallest-margin fraction of the "
                       "batch, CE on the rest.", "ce"),
    "ovr": MethodSpec("OVR alone (ablation): one-vs-the-rest loss on every PGD example.", "ce"),
    "trades": MethodSpec("TRADES (Zhang et al. 2019): clean CE + beta * KL(p(x) || p(x')).",
                         "kl", default_init="normal", clean_forward=True),
    "mart": MethodSpec("MART (Wang et al. 2020): boosted CE + beta * KL weighted by 1 - p_y(x).",
                       "ce", default_init="normal", clean_forward=True),
    "mail_at": MethodSpec("MAIL-AT (Wang et al. 2021): CE weighted by the probabilistic margin.",
                          "ce", default_init="normal"),
    "mail_trades": MethodSpec("MAIL-TRADES (Wang et al. 2021): TRADES with the KL term weighted "
                              "by the probabilistic margin.", "kl", default_init="normal",
                              clean_forward=True),
    "gairat": MethodSpec("GAIRAT (Zhang et al. 2021): CE weighted by the number of attack "
                         "iterates still classified correctly.", "ce", needs_kappa=True),
}


def get_spec(name: str) -> MethodSpec:
  if name not in METHODS:
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}.")
  return METHODS[name]


def reweight_start_epoch(name: str, cfg: Any, epochs: int) -> int:
  """First epoch (0-based) with MAIL/GAIRAT reweighting.

  ``start_epoch`` is that epoch; -1 (the default) is the authors' recipe scaled to
  ``epochs``. MAIL's train.py reweights from 0-based epoch 75 (``range(begin_epoch,
  epochs)``, its warm start) and stops after epoch 100: 75 %. GAIRAT.py reweights where
  ``(epoch + 1) >= begin_epoch`` with begin_epoch 60 of 120: from 0-based epoch 59, the 60th
  epoch, so half the epochs, rounded, minus one.
  """
  if name in ("mail_at", "mail_trades"):
    start, first = cfg.mail.start_epoch, int(round(0.75 * epochs))
  elif name == "gairat":
    start, first = cfg.gairat.start_epoch, max(0, int(round(0.5 * epochs)) - 1)
  else:
    return 0
  return first if start < 0 else int(start)


def mart_beta(cfg: Any) -> float:
  """MART's beta: ``mart.beta``, or where it is -1 (the default) the authors' value for the
  model: 6 for the WideResNets (train_wideresnet.py), 5 for the others (train_resnet.py)."""
  beta = float(cfg.mart.beta)
  if beta != -1.0:
    return beta
  return 6.0 if str(cfg.model.name).startswith("wrn") else 5.0


def method_loss(name: str, cfg: Any, *, adv_logits: Array, labels: Array,
                clean_logits: Array | None = None, kappa: Array | None = None,
                reweight: Array | bool = True,
                num_attack_steps: int = 0) -> tuple[Array, dict[str, Array]]:
  """Per-example loss [N] of method ``name`` and auxiliary per-example values.

  Args:
    name: a key of METHODS.
    cfg: the method section of the config (``config.sovr``, ``.trades``, ...
      are read from it; the whole config is fine).
    adv_logits: logits on the attack's output (clean logits for "standard").
    labels: int labels [N].
    clean_logits: logits on the clean input, with gradient (TRADES, MART,
      MAIL-TRADES).
    kappa: GAIRAT's count of correctly classified attack iterates.
    reweight: whether MAIL/GAIRAT reweighting is active (a traced bool, so the
      switch at the start epoch does not recompile); before it, MAIL-AT and
      GAIRAT are PGD-AT and MAIL-TRADES is TRADES.
    num_attack_steps: K of the training attack (GAIRAT).

  Returns:
    (loss [N], aux) with aux["switched"] the examples trained with OVR (SOVR:
    its mask, OVR: all, others: none) and aux["weight"] the per-example
    weights (ones where a method has none).
  """
  get_spec(name)
  n = labels.shape[0]
  ones = jnp.ones((n,), jnp.float32)
  switched = jnp.zeros((n,), bool)
  weight = ones
  if name in ("standard", "pgd_at"):
    loss = losses.cross_entropy(adv_logits, labels)
  elif name == "sovr":
    c = cfg.sovr
    if c.margin_on not in ("adv", "clean"):
      raise ValueError(f"sovr.margin_on must be 'adv' or 'clean', got {c.margin_on!r}.")
    margin_logits = adv_logits if c.margin_on == "adv" else clean_logits
    if margin_logits is None:
      raise ValueError("sovr.margin_on='clean' needs the clean logits.")
    loss, switched = losses.sovr(adv_logits, labels, ovr_fraction=c.ovr_fraction,
                                 margin_logits=margin_logits, ovr_reduce=c.ovr_reduce)
  elif name == "ovr":
    loss = losses.ovr(adv_logits, labels, reduce=cfg.sovr.ovr_reduce)
    switched = jnp.ones((n,), bool)
  elif name == "trades":
    loss = losses.trades(clean_logits, adv_logits, labels, beta=cfg.trades.beta)
  elif name == "mart":
    loss = losses.mart(clean_logits, adv_logits, labels, beta=mart_beta(cfg))
  elif name in ("mail_at", "mail_trades"):
    c = cfg.mail
    w = losses.mail_weights(adv_logits, labels, bias=c.bias, slope=c.slope)
    weight = jnp.where(reweight, w, ones)
    if name == "mail_at":
      loss = weight * losses.cross_entropy(adv_logits, labels)
    else:
      loss = (losses.cross_entropy(clean_logits, labels)
              + c.beta * weight * losses.kl_divergence(clean_logits, adv_logits))
  else:  # gairat
    w = losses.gairat_weights(kappa, num_attack_steps, lam=cfg.gairat.lam)
    weight = jnp.where(reweight, w, ones)
    loss = weight * losses.cross_entropy(adv_logits, labels)
  return loss, {"switched": switched, "weight": weight}
