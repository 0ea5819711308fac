"""The method table (sovr_jax.methods): each baseline's attack start, reweighting epoch and
MART's beta as in its authors' public code (../shared/docs/method.md: "The baselines follow
their authors' public code")."""

import jax.numpy as jnp
import numpy as np
import pytest

from sovr_jax import default_config, losses, methods, train

# The attack's start in each authors' code: TRADES's trades_loss, MART's mart_loss and MAIL's
# mail_loss start at x + 0.001 * randn; Madry et al.'s PGD and GAIRAT's GA_PGD (rand_init)
# uniformly in the ball. SOVR's code was not released: it attacks as PGD-AT (our choice).
AUTHORS_INIT = {"trades": "normal", "mart": "normal", "mail_at": "normal",
                "mail_trades": "normal", "pgd_at": "uniform", "gairat": "uniform",
                "sovr": "uniform", "ovr": "uniform"}


@pytest.mark.parametrize("method", sorted(AUTHORS_INIT))
def test_auto_attack_start_is_the_authors(method):
  cfg = default_config.get_config()
  cfg.method = method
  assert train.attack_init(cfg) == AUTHORS_INIT[method]
  cfg.attack.init = "zero"  # an explicit choice wins
  assert train.attack_init(cfg) == "zero"


def test_every_attacking_method_has_a_stated_start():
  attacking = {m for m, s in methods.METHODS.items() if s.attack_objective is not None}
  assert attacking == set(AUTHORS_INIT)


@pytest.mark.parametrize("method,epochs,first", [
    ("gairat", 120, 59),       # GAIRAT.py: (epoch + 1) >= begin_epoch = 60, 0-based epochs
    ("gairat", 36, 17),
    ("gairat", 2, 0),
    ("gairat", 1, 0),
    ("mail_at", 100, 75),      # MAIL's train.py: range(75, ...) after its warm start
    ("mail_trades", 36, 27),
    ("pgd_at", 36, 0),         # no reweighting to start
])
def test_reweighting_starts_where_the_authors_recipe_does(method, epochs, first):
  cfg = default_config.get_config()
  assert methods.reweight_start_epoch(method, cfg, epochs) == first
  cfg.mail.start_epoch = cfg.gairat.start_epoch = 3  # an explicit epoch is taken as it is
  assert methods.reweight_start_epoch(method, cfg, epochs) == (0 if method == "pgd_at" else 3)


@pytest.mark.parametrize("model_name,beta", [("preact_resnet18", 5.0), ("resnet18", 5.0),
                                             ("wrn34_10", 6.0), ("wrn28_10", 6.0)])
def test_mart_beta_is_the_authors_for_the_model_unless_set(model_name, beta):
  """MART's train_resnet.py uses beta 5, train_wideresnet.py 6; the loss uses it."""
  cfg = default_config.get_config()
  cfg.method, cfg.model.name = "mart", model_name
  assert methods.mart_beta(cfg) == beta
  rng = np.random.default_rng(0)
  zc, za = (jnp.asarray(rng.normal(size=(4, 10)), jnp.float32) for _ in range(2))
  y = jnp.asarray([0, 3, 5, 9])
  got, _ = methods.method_loss("mart", cfg, adv_logits=za, labels=y, clean_logits=zc)
  np.testing.assert_allclose(got, losses.mart(zc, za, y, beta=beta), rtol=1e-6)
  cfg.mart.beta = 2.5
  assert methods.mart_beta(cfg) == 2.5
