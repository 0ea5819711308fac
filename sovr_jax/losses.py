"""Per-example losses and weights for adversarial training.

Every function returns per-example values of shape [N]; the caller reduces
(usually with the mean). Logits of any float dtype are cast to float32 first, so
bfloat16 models get float32 losses, and every formula goes through
``log_softmax`` / ``softplus`` so logits of magnitude 1e4 stay finite.

Notation (../shared/docs/method.md): logits z in R^K, label y, p = softmax(z),
clean input x, adversarial input x'.

Sources:
  * SOVR, OVR, logit margin: Kanai et al., "One-vs-the-Rest Loss to Focus on
    Important Samples in Adversarial Training", ICML 2023.
  * TRADES: Zhang et al., ICML 2019 (github.com/yaodongyu/TRADES).
  * MART: Wang et al., ICLR 2020 (github.com/YisenWang/MART).
  * MAIL: Wang et al., NeurIPS 2021 (github.com/QizhouWang/MAIL).
  * GAIRAT: Zhang et al., ICLR 2021
    (github.com/zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _check_inputs(logits: Array, labels: Array) -> tuple[Array, Array]:
  """Asserts shapes, checks label range where it is concrete, casts to float32."""
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix((logits, labels), 1)
  chex.assert_type(labels, int)
  num_classes = logits.shape[-1]
  if not isinstance(labels, jax.core.Tracer):
    labels_np = np.asarray(labels)
    if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= num_classes):
      raise ValueError(
          f"labels must lie in [0, {num_classes}) for logits with {num_classes} "
          f"classes; got min {labels_np.min()}, max {labels_np.max()}.")
  return logits.astype(jnp.float32), labels


def _true_logit(logits: Array, labels: Array) -> Array:
  return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _max_other(values: Array, labels: Array) -> Array:
  """max_{k != y} values_k."""
  one_hot = jax.nn.one_hot(labels, values.shape[-1], dtype=bool)
  return jnp.max(jnp.where(one_hot, -jnp.inf, values), axis=-1)


def logit_margin(logits: Array, labels: Array) -> Array:
  """Logit margin m(z, y) = z_y - max_{k != y} z_k (negative = misclassified)."""
  logits, labels = _check_inputs(logits, labels)
  return _true_logit(logits, labels) - _max_other(logits, labels)


def cross_entropy(logits: Array, labels: Array) -> Array:
  """l_CE(z, y) = -z_y + logsumexp_k z_k = -log softmax(z)_y."""
  logits, labels = _check_inputs(logits, labels)
  return -_true_logit(jax.nn.log_softmax(logits), labels)


def ovr(logits: Array, labels: Array, *, reduce: str = "sum") -> Array:
  """One-vs-the-rest loss, the sum of K binary logistic losses.

  l_OVR(z, y) = softplus(-z_y) + sum_{k != y} softplus(z_k)
  (Kanai et al. 2023, Eq. 3). ``reduce="mean"`` divides by K (an **open**
  choice of the paper; the default is the sum).
  """
  if reduce not in ("sum", "mean"):
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}.")
  logits, labels = _check_inputs(logits, labels)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  # softplus(-z) for the true class, softplus(z) for the others.
  per_class = jax.nn.softplus(jnp.where(one_hot > 0, -logits, logits))
  total = jnp.sum(per_class, axis=-1)
  return total / logits.shape[-1] if reduce == "mean" else total


def num_switched(batch_size: int, ovr_fraction: float) -> int:
  """ceil(rho * N), robust to float round-off (0.3 * 10 is 3, not 4)."""
  if not 0.0 <= ovr_fraction <= 1.0:
    raise ValueError(f"ovr_fraction must lie in [0, 1], got {ovr_fraction}.")
  return int(math.ceil(round(ovr_fraction * batch_size, 6)))


def smallest_margin_mask(margins: Array, k: int) -> Array:
  """Boolean mask of the k smallest margins; ties broken by lower index.

  A stable argsort makes the tie-break deterministic. Under ``jax.jit`` with a
  sharded batch the sort is over the global batch.
  """
  chex.assert_rank(margins, 1)
  order = jnp.argsort(margins, stable=True)
  ranks = jnp.zeros(margins.shape, jnp.int32).at[order].set(
      jnp.arange(margins.shape[0], dtype=jnp.int32))
  return ranks < k


def sovr(logits: Array, labels: Array, *, ovr_fraction: float,
         margin_logits: Array | None = None,
         ovr_reduce: str = "sum") -> tuple[Array, Array]:
  """Switching one-vs-the-rest loss (SOVR), Kanai et al. 2023, Eq. 5.

  Per batch, the set S of the ceil(rho * N) examples with the smallest logit
  margins m(margin_logits_i, y_i) is treated as constant (no gradient through
  the selection). Per example:

      l_i = l_OVR(z_i, y_i)  if i in S  else  l_CE(z_i, y_i),

  and the batch loss is mean_i l_i. ``margin_logits`` defaults to ``logits``
  (the adversarial logits in training; the paper's **open** choice, default
  adversarial as in docs/method.md). With ``sovr.margin_on="clean"`` the train step
  passes the clean logits of the model with its running BatchNorm statistics (our
  choice: the eval-mode clean logits the step already computes). rho
  (``sovr.ovr_fraction``) is **open** too; its default 0.4 is our choice until the
  study's sweep.

  Returns:
    (per-example loss [N] float32, switched-to-OVR mask [N] bool).
  """
  k = num_switched(logits.shape[0], ovr_fraction)
  logits, labels = _check_inputs(logits, labels)
  if margin_logits is None:
    margin_logits = logits
  chex.assert_equal_shape((logits, margin_logits))
  margins = logit_margin(jax.lax.stop_gradient(margin_logits), labels)
  mask = jax.lax.stop_gradient(smallest_margin_mask(margins, k))
  loss = jnp.where(mask, ovr(logits, labels, reduce=ovr_reduce),
                   cross_entropy(logits, labels))
  return loss, mask


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
  """KL(p || q) = sum_k p_k (log p_k - log q_k), p = softmax(p_logits)."""
  chex.assert_equal_shape((p_logits, q_logits))
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32))
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _check_beta(beta: float) -> None:
  if beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}.")


def trades(clean_logits: Array, adv_logits: Array, labels: Array, *,
           beta: float = 6.0) -> Array:
  """TRADES (Zhang et al. 2019): l_CE(z(x), y) + beta * KL(p(x) || p(x')).

  Gradients flow through both the clean and the adversarial logits, as in the
  authors' ``trades_loss``. Its training forward passes differ in one way (our choice):
  ``train.make_train_step`` runs the clean batch once and the adversarial batch once in
  train mode, where ``trades_loss`` runs the clean batch twice (for the CE and for the KL
  target; the same logits in train mode, so the same gradient), so the authors' BatchNorm
  running statistics get one more update from the clean batch per step.
  """
  _check_beta(beta)
  chex.assert_equal_shape((clean_logits, adv_logits))
  return (cross_entropy(clean_logits, labels)
          + beta * kl_divergence(clean_logits, adv_logits))


def mart(clean_logits: Array, adv_logits: Array, labels: Array, *,
         beta: float = 6.0) -> Array:
  """MART (Wang et al. 2020).

      [l_CE(z(x'), y) - log(1.0001 - p_{k*}(x'))]
        + beta * KL(p(x) || p(x')) * (1 - p_y(x)),
      k* = argmax_{k != y} p_k(x').

  As in the authors' ``mart_loss``, the boosted-CE term uses 1.0001 and the
  weight uses 1.0000001 - p_y(x); gradients flow through every term. The KL is
  computed from log-softmax rather than log(p + 1e-12), so it stays exact for
  saturated probabilities; log(1.0001 - p) leaves out the authors' + 1e-12 (its
  argument is at least 1e-4, so the term moves by at most 1e-8 relative).
  """
  _check_beta(beta)
  chex.assert_equal_shape((clean_logits, adv_logits))
  adv_logits, labels = _check_inputs(adv_logits, labels)
  clean_logits = clean_logits.astype(jnp.float32)
  adv_probs = jax.nn.softmax(adv_logits)
  p_other = _max_other(adv_probs, labels)
  boosted_ce = cross_entropy(adv_logits, labels) - jnp.log(1.0001 - p_other)
  p_true_clean = _true_logit(jax.nn.softmax(clean_logits), labels)
  return boosted_ce + beta * kl_divergence(clean_logits, adv_logits) * (
      1.0000001 - p_true_clean)


def probabilistic_margin(logits: Array, labels: Array) -> Array:
  """MAIL's PM = max_{k != y} p_k - p_y (positive = misclassified)."""
  logits, labels = _check_inputs(logits, labels)
  probs = jax.nn.softmax(logits)
  return _max_other(probs, labels) - _true_logit(probs, labels)


def mail_weights(adv_logits: Array, labels: Array, *, bias: float = -1.5,
                 slope: float = 1.0) -> Array:
  """MAIL weights w = 3 * sigmoid(slope * (PM(x') + bias)), no gradient.

  Wang et al. 2021, ``weight_assign`` in the authors' code. MAIL-AT is
  mean(w * l_CE(z(x'), y)); MAIL-TRADES is l_CE(z(x), y) + beta * mean(w * KL).
  """
  pm = probabilistic_margin(adv_logits, labels)
  return jax.lax.stop_gradient(3.0 * jax.nn.sigmoid(slope * (pm + bias)))


def gairat_weights(kappa: Array, num_steps: int, *, lam: float = -1.0) -> Array:
  """GAIRAT weights (Zhang et al. 2021), normalised to batch mean 1.

      w_i = (tanh(lam + 5 * (h - kappa_i) / h) + 1) / 2,  h = num_steps // 2,
      w <- w * N / sum(w),

  where kappa_i counts the attack iterates still classified correctly. h is
  ``int(num_steps / 2)`` as in the authors' ``GAIR`` (= K/2 of method.md for
  even K). No gradient flows through the weights.
  """
  chex.assert_rank(kappa, 1)
  half = num_steps // 2
  if half < 1:
    raise ValueError(f"num_steps must be >= 2 for GAIRAT, got {num_steps}.")
  kappa = kappa.astype(jnp.float32)
  # (tanh(a) + 1) / 2 == sigmoid(2a), without the cancellation near tanh = -1.
  w = jax.nn.sigmoid(2.0 * (lam + 5.0 * (half - kappa) / half))
  w = w * w.shape[0] / jnp.sum(w)
  return jax.lax.stop_gradient(w)
