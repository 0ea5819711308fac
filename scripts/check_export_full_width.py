"""JAX vs exported-PyTorch agreement of every architecture at FULL width (width 1.0).

    python -m scripts.check_export_full_width [--batch 2] [--threads 1] [--out results/x.json]

The tests (tests/test_export.py) check the same thing at tiny widths in seconds; this script
checks the real models (PreActResNet-18, ResNet-18, WRN-34-10, WRN-28-10 on 32x32x3, SmallCNN on
28x28x1) in a few minutes on CPU. Each model gets random parameters (LeCun-normal kernels, random
BatchNorm scale/bias and biases), running statistics from three train-mode forwards on random
images then perturbed per channel, and per-channel mean/std. On ``--batch`` random images it
compares, with float32 matmul precision on both sides:

* logits: max |jax - torch| / max |jax|            (must be < 1e-4)
* input gradients of the mean cross-entropy: same  (must be < 1e-3)
* predicted labels (must agree)

Exits with status 1 if any architecture fails. Not run by the tests (it takes minutes).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from sovr_jax import export, models, torch_models

ARCHITECTURES = ("preact_resnet18", "resnet18", "wrn34_10", "wrn28_10", "small_cnn")
NUM_CLASSES = 10
LOGIT_RTOL, GRAD_RTOL = 1e-4, 1e-3


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


def check(name, batch, seed=0):
  t0 = time.time()
  h, w, c = (28, 28, 1) if name == "small_cnn" else (32, 32, 3)
  mean = tuple(np.linspace(0.4, 0.5, c).tolist())
  std = tuple(np.linspace(0.2, 0.3, c).tolist())
  model = models.get_model(name, num_classes=NUM_CLASSES, width=1.0, mean=mean, std=std)
  x = jax.random.uniform(jax.random.PRNGKey(seed), (batch, h, w, c))
  labels = jnp.arange(batch) % NUM_CLASSES
  variables = random_variables(model, x, seed)

  @jax.jit
  def logits_and_grad(v, x):
    def loss(x):
      logits = model.apply(v, x, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
    (_, logits), g = jax.value_and_grad(loss, has_aux=True)(x)
    return logits, g

  jax_logits, jax_grad = jax.device_get(logits_and_grad(variables, x))
  t_jax = time.time() - t0

  sd = export.to_state_dict(name, variables["params"], variables["batch_stats"], mean=mean,
                            std=std)
  tm = torch_models.build_torch_model(name, num_classes=NUM_CLASSES, width=1.0, mean=mean,
                                      std=std, input_shape=(c, h, w))
  torch_models.load_weights(tm, sd).eval()
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).requires_grad_(True)
  logits = tm(xt)
  F.cross_entropy(logits, torch.from_numpy(np.array(labels)).long()).backward()
  torch_logits = logits.detach().numpy()
  torch_grad = xt.grad.permute(0, 2, 3, 1).numpy()

  def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())

  res = {
      "architecture": name,
      "params": models.count_params(variables["params"]),
      "torch_params": int(sum(p.numel() for p in tm.parameters())),
      "batch": batch,
      "logit_rel_err": rel(torch_logits, jax_logits),
      "grad_rel_err": rel(torch_grad, jax_grad),
      "labels_agree": bool((torch_logits.argmax(1) == jax_logits.argmax(1)).all()),
      "max_abs_logit": float(np.abs(jax_logits).max()),
      "jax_s": t_jax,
      "total_s": time.time() - t0,
  }
  res["ok"] = bool(res["logit_rel_err"] < LOGIT_RTOL and res["grad_rel_err"] < GRAD_RTOL
                   and res["labels_agree"] and res["params"] == res["torch_params"])
  return res


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2, help="random images per architecture")
  parser.add_argument("--threads", type=int, default=1,
                      help="PyTorch CPU threads (0 = PyTorch's default)")
  parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
  parser.add_argument("--out", help="also write the results to this JSON file")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  names = [a.strip() for a in args.architectures.split(",") if a.strip()]
  for name in names:
    torch_models.check_architecture(name)
  print(f"JAX {jax.__version__} ({jax.devices()[0].platform}) vs PyTorch {torch.__version__}, "
        f"width 1.0, batch {args.batch}, tolerances: logits {LOGIT_RTOL:g}, grads {GRAD_RTOL:g} "
        f"(relative to the max |value|)", flush=True)
  print(f"{'architecture':<16} {'params':>11} {'logit rel err':>14} {'grad rel err':>13} "
        f"{'labels':>7} {'time s':>7}  result", flush=True)
  results = []
  with jax.default_matmul_precision("float32"):
    for name in names:
      r = check(name, args.batch)
      results.append(r)
      print(f"{name:<16} {r['params']:>11,} {r['logit_rel_err']:>14.2e} {r['grad_rel_err']:>13.2e} "
            f"{'agree' if r['labels_agree'] else 'DIFFER':>7} {r['total_s']:>7.1f}  "
            f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  ok = all(r["ok"] for r in results)
  print("all architectures agree" if ok else "SOME ARCHITECTURES DISAGREE", flush=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
