"""Helpers for checks of models against their twins (tests and scripts/)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, x, seed):
  """Random params in init's structure (NumPy-filled; compiling the initialisers is slow on CPU),
  batch_stats from three train-mode forwards, perturbed per channel."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    keys = [getattr(p, "key", str(p)) for p in path]
    if keys[-1] == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif keys[0] == "batch_stats":
      value = np.zeros(leaf.shape) if keys[-1] == "mean" else np.ones(leaf.shape)
    elif keys[-1] == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0, 0.1, leaf.shape)
    return jnp.asarray(value, jnp.float32)

  v = jax.tree_util.tree_map_with_path(
      fill, jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x))
  params, stats = v["params"], v.get("batch_stats", {})

  @jax.jit
  def update(stats, xb):
    _, upd = model.apply({"params": params, "batch_stats": stats}, xb, train=True,
                         mutable=["batch_stats"])
    return upd.get("batch_stats", stats)

  for i in range(3):
    stats = update(stats, jax.random.uniform(jax.random.PRNGKey(100 + i), x.shape))

  def perturb(path, s):
    if "mean" in str(path[-1]):
      return s + jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32)
    return s * jnp.asarray(rng.uniform(0.8, 1.25, s.shape), jnp.float32)

  return {"params": params, "batch_stats": jax.tree_util.tree_map_with_path(perturb, stats)}
