"""Losses against plain-numpy formulas and the authors' PyTorch code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sovr_jax import losses
from tests import references

if references.have("torch"):  # the authors' PyTorch code; those tests skip without it
  import torch
  import torch.nn.functional as F


def _batch(seed=0, n=16, k=10, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((n, k))).astype(np.float32)
  labels = rng.integers(0, k, n).astype(np.int32)
  return logits, labels


# ----------------------------------------------------------- numpy references
def np_log_softmax(z):
  z = z.astype(np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_softplus(z):
  return np.logaddexp(0.0, z.astype(np.float64))


def np_margin(z, y):
  zo = z.astype(np.float64).copy()
  true = zo[np.arange(len(y)), y].copy()
  zo[np.arange(len(y)), y] = -np.inf
  return true - zo.max(-1)


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_ovr(z, y):
  out = []
  for zi, yi in zip(z.astype(np.float64), y):
    out.append(np_softplus(-zi[yi]) + sum(np_softplus(zi[k]) for k in range(len(zi)) if k != yi))
  return np.array(out)


# ---------------------------------------------- authors' PyTorch formulations
def torch_trades(logits_nat, logits_adv, y, beta):
  """yaodongyu/TRADES trades_loss, per example (their mean over the batch)."""
  kl = torch.nn.KLDivLoss(reduction="none")
  loss_natural = F.cross_entropy(logits_nat, y, reduction="none")
  loss_robust = kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1)).sum(1)
  return loss_natural + beta * loss_robust


def torch_mart(logits, logits_adv, y, beta):
  """YisenWang/MART mart_loss, per example (their mean over the batch)."""
  kl = torch.nn.KLDivLoss(reduction="none")
  adv_probs = F.softmax(logits_adv, dim=1)
  tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
  new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
  loss_adv = F.cross_entropy(logits_adv, y, reduction="none") + F.nll_loss(
      torch.log(1.0001 - adv_probs + 1e-12), new_y, reduction="none")
  nat_probs = F.softmax(logits, dim=1)
  true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
  loss_robust = torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (
      1.0000001 - true_probs)
  return loss_adv + beta * loss_robust


def torch_mail_weights(logit, target, bias, slope):
  """QizhouWang/MAIL PM + weight_assign."""
  k = logit.shape[1]
  eye = torch.eye(k)
  probs_gt = (logit.softmax(1) * eye[target]).sum(1).detach()
  top2_probs = logit.softmax(1).topk(2, largest=True)
  gt_in_top2 = (top2_probs[1] == target.view(-1, 1)).float().sum(1) == 1
  probs_2nd = torch.where(gt_in_top2, top2_probs[0].sum(1) - probs_gt,
                          top2_probs[0][:, 0]).detach()
  pm = probs_2nd - probs_gt
  return ((pm + bias) * slope).sigmoid().detach() * 3


def torch_gair(num_steps, kappa, lam):
  """zjfheart/GAIRAT GAIR, 'Tanh' weighting."""
  hsteps = int(num_steps / 2)
  reweight = ((lam + (hsteps - kappa) * 5 / hsteps).tanh() + 1) / 2
  return reweight * len(reweight) / reweight.sum()


T = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731


# ------------------------------------------------------------------- basics
def test_margin_ce_ovr_match_numpy():
  z, y = _batch()
  np.testing.assert_allclose(losses.logit_margin(z, y), np_margin(z, y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(z, y), np_ce(z, y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.ovr(z, y), np_ovr(z, y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.ovr(z, y, reduce="mean"), np_ovr(z, y) / 10, rtol=1e-5)


@references.needs("torch")
def test_ce_matches_torch():
  z, y = _batch(1)
  ref = F.cross_entropy(T(z), T(y).long(), reduction="none").numpy()
  np.testing.assert_allclose(losses.cross_entropy(z, y), ref, rtol=1e-5, atol=1e-6)


def test_margin_sign_is_correctness():
  z, y = _batch(2)
  correct = np.argmax(z, -1) == y
  np.testing.assert_array_equal(np.asarray(losses.logit_margin(z, y)) > 0, correct)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stable_for_huge_logits(dtype):
  z, y = _batch(3, scale=1e4)
  zc = jnp.asarray(z, dtype)
  zl = np.asarray(zc.astype(jnp.float32))
  outs = {
      "ce": losses.cross_entropy(zc, y),
      "ovr": losses.ovr(zc, y),
      "sovr": losses.sovr(zc, y, ovr_fraction=0.5)[0],
      "trades": losses.trades(zc, zc[::-1], y),
      "mart": losses.mart(zc, zc[::-1], y),
      "mail": losses.mail_weights(zc, y),
      "margin": losses.logit_margin(zc, y),
  }
  for name, v in outs.items():
    assert v.dtype == jnp.float32, name
    assert np.all(np.isfinite(np.asarray(v))), name
  np.testing.assert_allclose(outs["ce"], np_ce(zl, y), rtol=1e-5)
  np.testing.assert_allclose(outs["ovr"], np_ovr(zl, y), rtol=1e-5)
  grads = jax.grad(lambda z: losses.sovr(z, y, ovr_fraction=0.5)[0].mean())(zc.astype(jnp.float32))
  assert np.all(np.isfinite(np.asarray(grads)))


def test_bfloat16_close_to_float32():
  z, y = _batch(4)
  zb = jnp.asarray(z, jnp.bfloat16)
  zf = zb.astype(jnp.float32)
  for fn in (losses.cross_entropy, losses.ovr, losses.logit_margin):
    np.testing.assert_allclose(fn(zb, y), fn(zf, y), rtol=1e-6)


# --------------------------------------------------------------------- SOVR
def test_sovr_endpoints():
  z, y = _batch(5)
  l0, m0 = losses.sovr(z, y, ovr_fraction=0.0)
  l1, m1 = losses.sovr(z, y, ovr_fraction=1.0)
  np.testing.assert_allclose(l0, losses.cross_entropy(z, y), rtol=1e-6)
  np.testing.assert_allclose(l1, losses.ovr(z, y), rtol=1e-6)
  assert not np.any(m0) and np.all(m1)


@pytest.mark.parametrize("n,rho", [(16, 0.5), (10, 0.3), (7, 0.2), (128, 0.1), (5, 0.99)])
def test_sovr_mask_picks_smallest_margins(n, rho):
  z, y = _batch(6, n=n)
  _, mask = losses.sovr(z, y, ovr_fraction=rho)
  k = math.ceil(round(rho * n, 6))
  assert int(mask.sum()) == k
  margins = np_margin(z, y)
  expected = np.zeros(n, bool)
  expected[np.argsort(margins, kind="stable")[:k]] = True
  np.testing.assert_array_equal(mask, expected)
  if 0 < k < n:
    assert margins[np.asarray(mask)].max() <= margins[~np.asarray(mask)].min()


def test_num_switched_rounding():
  assert losses.num_switched(10, 0.3) == 3    # 0.3 * 10 = 3.0000000000000004
  assert losses.num_switched(10, 0.31) == 4
  assert losses.num_switched(128, 0.0) == 0
  assert losses.num_switched(128, 1.0) == 128


def test_sovr_ties_are_deterministic_lowest_index_first():
  z = np.zeros((6, 4), np.float32)  # every margin is 0
  y = np.zeros(6, np.int32)
  _, mask = losses.sovr(z, y, ovr_fraction=0.5)
  np.testing.assert_array_equal(mask, [True, True, True, False, False, False])
  _, mask_jit = jax.jit(lambda z, y: losses.sovr(z, y, ovr_fraction=0.5))(z, y)
  np.testing.assert_array_equal(mask_jit, mask)


def test_sovr_gradient_equals_fixed_mask_mixture():
  z, y = _batch(7)
  _, mask = losses.sovr(z, y, ovr_fraction=0.4)
  g = jax.grad(lambda z: losses.sovr(z, y, ovr_fraction=0.4)[0].mean())(jnp.asarray(z))
  mask_f = np.asarray(mask, np.float32)

  def mixture(z):
    return jnp.mean(mask_f * losses.ovr(z, y) + (1 - mask_f) * losses.cross_entropy(z, y))
  np.testing.assert_allclose(g, jax.grad(mixture)(jnp.asarray(z)), rtol=1e-5, atol=1e-7)


def test_sovr_margin_logits_select_and_no_gradient():
  z, y = _batch(8)
  other, _ = _batch(9)
  _, mask = losses.sovr(z, y, ovr_fraction=0.25, margin_logits=other)
  expected = np.zeros(len(y), bool)
  expected[np.argsort(np_margin(other, y), kind="stable")[:4]] = True
  np.testing.assert_array_equal(mask, expected)
  g = jax.grad(lambda o: losses.sovr(z, y, ovr_fraction=0.25, margin_logits=o)[0].sum())(
      jnp.asarray(other))
  np.testing.assert_array_equal(g, np.zeros_like(other))


def test_sovr_bad_fraction():
  z, y = _batch()
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="ovr_fraction"):
      losses.sovr(z, y, ovr_fraction=bad)


def test_labels_out_of_range():
  z, y = _batch()
  y = y.copy()
  y[0] = 10
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy(z, y)
  with pytest.raises(ValueError, match="labels"):
    losses.sovr(z, -np.abs(y) - 1, ovr_fraction=0.5)


# ----------------------------------------------------------------- baselines
@references.needs("torch")
def test_trades_matches_authors_code():
  z, y = _batch(10)
  za, _ = _batch(11)
  ref = torch_trades(T(z), T(za), T(y).long(), 6.0).numpy()
  np.testing.assert_allclose(losses.trades(z, za, y, beta=6.0), ref, rtol=1e-5, atol=1e-5)
  # Gradients through both branches, as in the reference.
  tz, tza = T(z).requires_grad_(), T(za).requires_grad_()
  torch_trades(tz, tza, T(y).long(), 6.0).sum().backward()
  gz, gza = jax.grad(lambda a, b: losses.trades(a, b, y, beta=6.0).sum(), (0, 1))(z, za)
  np.testing.assert_allclose(gz, tz.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gza, tza.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_trades_kl_is_zero_on_equal_logits():
  z, y = _batch(12)
  np.testing.assert_allclose(losses.trades(z, z, y, beta=6.0), np_ce(z, y), rtol=1e-5)


@references.needs("torch")
def test_mart_matches_authors_code():
  z, y = _batch(13)
  za, _ = _batch(14)
  ref = torch_mart(T(z), T(za), T(y).long(), 5.0).numpy()
  np.testing.assert_allclose(losses.mart(z, za, y, beta=5.0), ref, rtol=1e-4, atol=1e-5)
  tz, tza = T(z).requires_grad_(), T(za).requires_grad_()
  torch_mart(tz, tza, T(y).long(), 5.0).sum().backward()
  gz, gza = jax.grad(lambda a, b: losses.mart(a, b, y, beta=5.0).sum(), (0, 1))(z, za)
  np.testing.assert_allclose(gz, tz.grad.numpy(), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(gza, tza.grad.numpy(), rtol=1e-3, atol=1e-5)


@references.needs("torch")
def test_mail_weights_match_authors_code():
  z, y = _batch(15)
  ref = torch_mail_weights(T(z), T(y).long(), -1.5, 1.0).numpy()
  w = losses.mail_weights(z, y)
  np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)
  assert np.all((np.asarray(w) > 0) & (np.asarray(w) < 3))
  g = jax.grad(lambda z: losses.mail_weights(z, y).sum())(jnp.asarray(z))
  np.testing.assert_array_equal(g, 0.0)


@references.needs("torch")
@pytest.mark.parametrize("num_steps", [10, 7])
def test_gairat_weights_match_authors_code(num_steps):
  kappa = np.random.default_rng(0).integers(0, num_steps + 1, 32)
  ref = torch_gair(num_steps, T(kappa).double(), -1.0).numpy()
  w = losses.gairat_weights(jnp.asarray(kappa), num_steps, lam=-1.0)
  np.testing.assert_allclose(w, ref, rtol=1e-5)
  np.testing.assert_allclose(np.mean(w), 1.0, rtol=1e-6)
  # Fewer correct iterates (closer to the boundary) => larger weight.
  order = np.argsort(kappa)
  assert np.all(np.diff(np.asarray(w)[order]) <= 1e-6)


def test_bad_beta_and_shapes():
  z, y = _batch()
  with pytest.raises(ValueError, match="beta"):
    losses.trades(z, z, y, beta=-1.0)
  with pytest.raises(AssertionError):
    losses.cross_entropy(z[:, :, None], y)


def test_jit_matches_eager():
  z, y = _batch(16)
  f = jax.jit(lambda z, y: losses.sovr(z, y, ovr_fraction=0.5))
  l, m = f(z, y)
  l2, m2 = losses.sovr(z, y, ovr_fraction=0.5)
  np.testing.assert_allclose(l, l2, rtol=1e-6)
  np.testing.assert_array_equal(m, m2)
