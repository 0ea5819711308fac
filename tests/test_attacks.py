"""PGD: constraint sets, ascent, determinism, GAIRAT's kappa, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sovr_jax import attacks, losses

N, H, W, C, K = 8, 4, 4, 3, 5


def _model():
  """A fixed small non-linear classifier x -> logits."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(42))
  w1 = jax.random.normal(k1, (H * W * C, 16)) * 0.5
  w2 = jax.random.normal(k2, (16, K)) * 0.5

  def model_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2
  return model_fn


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (N, H, W, C)).astype(np.float32)
  # Put a few pixels on the box boundary to exercise the [0, 1] clip.
  x[0, 0, 0] = 0.0
  x[1, 0, 0] = 1.0
  y = rng.integers(0, K, N).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _norms(d, norm):
  d = np.asarray(d).reshape(d.shape[0], -1)
  return np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
@pytest.mark.parametrize("objective", ["ce", "kl", "margin"])
def test_output_in_ball_and_box(norm, eps, alpha, init, objective):
  x, y = _data()
  res = attacks.pgd(_model(), x, y, jax.random.PRNGKey(0), eps=eps, step_size=alpha,
                    num_steps=5, norm=norm, init=init, objective=objective)
  xa = np.asarray(res.x_adv)
  assert xa.dtype == np.float32 and xa.shape == x.shape
  assert xa.min() >= 0.0 and xa.max() <= 1.0
  assert np.all(_norms(xa - np.asarray(x), norm) <= eps * (1 + 1e-5) + 1e-7)
  assert res.kappa is None


@pytest.mark.parametrize("norm,eps,init", [("linf", 0.1, "uniform"), ("l2", 1.0, "uniform")])
def test_random_start_in_ball(norm, eps, init):
  x, _ = _data()
  d = attacks.init_delta(jax.random.PRNGKey(1), x, eps=eps, norm=norm, init=init)
  n = _norms(d, norm)
  assert np.all(n <= eps * (1 + 1e-5))
  assert np.all(n > 0)


@pytest.mark.parametrize("objective", ["ce", "margin"])
def test_attack_increases_objective(objective):
  model_fn = _model()
  x, y = _data(1)
  obj = attacks.objective_fn(objective)
  start = obj(model_fn(x), y, None)
  res = attacks.pgd(model_fn, x, y, jax.random.PRNGKey(0), eps=0.1, step_size=0.02,
                    num_steps=10, init="zero", objective=objective)
  end = obj(model_fn(res.x_adv), y, None)
  assert np.all(np.asarray(end) >= np.asarray(start) - 1e-5)
  assert float(jnp.mean(end)) > float(jnp.mean(start)) + 1e-3


def test_kl_objective_moves_away_from_clean():
  model_fn = _model()
  x, y = _data(2)
  res = attacks.pgd(model_fn, x, y, jax.random.PRNGKey(0), eps=0.1, step_size=0.02,
                    num_steps=10, init="normal", objective="kl")
  kl = losses.kl_divergence(model_fn(x), model_fn(res.x_adv))
  assert float(jnp.min(kl)) > 0.0
  start = losses.kl_divergence(model_fn(x), model_fn(x + 1e-3))
  assert float(jnp.mean(kl)) > 10 * float(jnp.mean(start))


def test_deterministic_for_a_key():
  model_fn = _model()
  x, y = _data()
  f = jax.jit(lambda k: attacks.pgd(model_fn, x, y, k, eps=0.1, step_size=0.02,
                                    num_steps=3).x_adv)
  a, b = f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, f(jax.random.PRNGKey(4)))


def _reference_pgd(model_fn, x, y, rng, eps, alpha, steps):
  """Step-by-step Python loop: x'_t, counting correct iterates before each step."""
  x = np.asarray(x)
  xa = np.asarray(attacks.init_delta(rng, jnp.asarray(x), eps=eps, norm="linf")) + x
  kappa = np.zeros(len(y), np.int32)
  grad_fn = jax.grad(lambda v: jnp.sum(losses.cross_entropy(model_fn(v), y)))
  for _ in range(steps):
    logits = np.asarray(model_fn(jnp.asarray(xa)))
    kappa += (logits.argmax(-1) == np.asarray(y)).astype(np.int32)
    g = np.asarray(grad_fn(jnp.asarray(xa)))
    xa = xa + alpha * np.sign(g)
    xa = np.clip(np.clip(xa, x - eps, x + eps), 0.0, 1.0)
  return xa, kappa


def test_kappa_and_iterates_match_reference_loop():
  model_fn = _model()
  x, y = _data(3)
  rng = jax.random.PRNGKey(5)
  eps, alpha, steps = 0.3, 0.1, 6
  res = attacks.pgd(model_fn, x, y, rng, eps=eps, step_size=alpha, num_steps=steps,
                    return_kappa=True)
  xa_ref, kappa_ref = _reference_pgd(model_fn, x, y, rng, eps, alpha, steps)
  np.testing.assert_array_equal(res.kappa, kappa_ref)
  np.testing.assert_allclose(res.x_adv, xa_ref, atol=1e-6)
  assert res.kappa.dtype == jnp.int32
  assert np.all((np.asarray(res.kappa) >= 0) & (np.asarray(res.kappa) <= steps))
  # A strong attack leaves some examples with fewer correct iterates.
  assert len(set(np.asarray(res.kappa).tolist())) > 1


def test_l2_projection():
  rng = np.random.default_rng(0)
  x = np.full((4, 3, 3, 1), 0.5, np.float32)
  delta = rng.standard_normal(x.shape).astype(np.float32) * 0.1
  delta[0] *= 100.0  # far outside the ball
  eps = 0.2
  out = np.asarray(attacks.project(jnp.asarray(x), jnp.asarray(delta), eps=eps, norm="l2"))
  flat = delta.reshape(4, -1)
  norms = np.linalg.norm(flat, axis=1)
  expected = flat * np.minimum(1.0, eps / norms)[:, None]
  expected = np.clip(x.reshape(4, -1) + expected, 0, 1) - x.reshape(4, -1)
  np.testing.assert_allclose(out.reshape(4, -1), expected, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out[0].ravel()), eps, rtol=1e-5)
  # Inside the ball: unchanged direction and length.
  inside = np.linalg.norm(flat, axis=1) < eps
  np.testing.assert_allclose(out.reshape(4, -1)[inside], flat[inside], atol=1e-6)


def test_l2_step_has_step_size_length():
  g = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
  d = attacks.ascent_step(jnp.zeros_like(g), g, step_size=0.3, norm="l2")
  np.testing.assert_allclose(_norms(d, "l2"), 0.3, rtol=1e-5)


def test_zero_eps_returns_input():
  x, y = _data()
  res = attacks.pgd(_model(), x, y, jax.random.PRNGKey(0), eps=0.0, step_size=0.1,
                    num_steps=3)
  np.testing.assert_allclose(res.x_adv, x, atol=0)


def test_gradient_does_not_flow_through_attack():
  model_fn = _model()
  x, y = _data()

  def f(x):
    return jnp.sum(attacks.pgd(model_fn, x, y, jax.random.PRNGKey(0), eps=0.1,
                               step_size=0.02, num_steps=2).x_adv)
  np.testing.assert_array_equal(jax.grad(f)(x), 0.0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(eps=-0.1), "eps"),
    (dict(step_size=-1.0), "step_size"),
    (dict(num_steps=-1), "num_steps"),
    (dict(norm="l1"), "norm"),
    (dict(objective="dlr"), "objective"),
    (dict(init="gauss"), "init"),
])
def test_bad_arguments(kwargs, name):
  x, y = _data()
  args = dict(eps=0.1, step_size=0.01, num_steps=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    attacks.pgd(_model(), x, y, jax.random.PRNGKey(0), **args)
