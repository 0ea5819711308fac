"""Helpers for checks of models against their twins (tests and scripts/)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def jax_logits_and_grad(model, variables, x, labels):
  """Eval-mode logits and the input gradient of the mean CE loss (NHWC)."""
  @jax.jit
  def f(v, x):
    def loss(x):
      logits = model.apply(v, x, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
    (_, logits), g = jax.value_and_grad(loss, has_aux=True)(x)
    return logits, g
  return jax.device_get(f(variables, x))


def torch_logits_and_grad(torch_model, x, labels):
  """The same for a PyTorch twin (NCHW inside, NHWC in and out)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).requires_grad_(True)
  logits = torch_model(xt)
  F.cross_entropy(logits, torch.from_numpy(np.array(labels)).long()).backward()
  return logits.detach().numpy(), xt.grad.permute(0, 2, 3, 1).numpy()
