"""JAX vs exported-PyTorch agreement of every architecture at FULL width (width 1.0).

    python -m scripts.check_export_full_width [--batch 2] [--threads 1] [--out results/x.json]

The tests (tests/test_export.py) check the same thing at tiny widths in seconds; this script
checks the real models (PreActResNet-18, ResNet-18, WRN-34-10, WRN-28-10 on 32x32x3, SmallCNN on
28x28x1) in a few minutes on CPU. Each model gets random parameters (LeCun-normal kernels, random
BatchNorm scale/bias and biases), running statistics from three train-mode forwards on random
images then perturbed per channel, and per-channel mean/std. On ``--batch`` random images it
compares logits and the input gradient of the mean cross-entropy (errors: max |torch - jax| /
max |jax|):

* in float32 (as deployed): logits < 1e-4 and labels must agree; gradients < 1e-3 is reported.
  At full width a float32 gradient can miss it without any conversion error: a pre-activation
  within rounding error of 0 flips its ReLU gate in one framework, which changes the gradient of
  the units it feeds (seen with PyTorch's oneDNN kernels on CPU; the columns jax32/64 and
  torch32/64 compare each float32 gradient with the float64 one to show which side rounds);
* in float64 on both sides (the same parameters cast up): logits and gradients < 1e-6, which a
  wrong layout, order, padding or statistic would miss by orders of magnitude.

Exits with status 1 if any architecture fails. Not run by the tests (it takes minutes).
"""

import argparse
import json
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 comparison; float32 is explicit

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sovr_jax import export, models, torch_models  # noqa: E402
from sovr_jax.testing import (jax_logits_and_grad, random_variables, rel_err,  # noqa: E402
                              torch_logits_and_grad)

ARCHITECTURES = ("preact_resnet18", "resnet18", "wrn34_10", "wrn28_10", "small_cnn")
NUM_CLASSES = 10
LOGIT_RTOL, GRAD_RTOL = 1e-4, 1e-3
#: float64 agreement required of both logits and gradients (the conversion itself).
F64_RTOL = 1e-6


def check(name, batch, seed=0):
  """float32 (as deployed) and float64 (rounding-free) comparisons for one architecture."""
  t0 = time.time()
  h, w, c = (28, 28, 1) if name == "small_cnn" else (32, 32, 3)
  mean = tuple(np.linspace(0.4, 0.5, c).tolist())
  std = tuple(np.linspace(0.2, 0.3, c).tolist())
  model = models.get_model(name, num_classes=NUM_CLASSES, width=1.0, mean=mean, std=std)
  x = jax.random.uniform(jax.random.PRNGKey(seed), (batch, h, w, c), jnp.float32)
  labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
  variables = random_variables(model, x, seed)
  jl32, jg32 = jax_logits_and_grad(model, variables, x, labels)

  sd = export.to_state_dict(name, variables["params"], variables["batch_stats"], mean=mean,
                            std=std)
  tm = torch_models.build_torch_model(name, num_classes=NUM_CLASSES, width=1.0, mean=mean,
                                      std=std, input_shape=(c, h, w))
  torch_models.load_weights(tm, sd).eval()
  tl32, tg32 = torch_logits_and_grad(tm, x, labels)

  # float64 on both sides (the Flax model still normalises the input in float32 by design).
  model64 = models.get_model(name, num_classes=NUM_CLASSES, width=1.0, mean=mean, std=std,
                             dtype=jnp.float64)
  v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
  x64 = jnp.asarray(x, jnp.float64)
  jl64, jg64 = jax_logits_and_grad(model64, v64, x64, labels)
  tl64, tg64 = torch_logits_and_grad(tm.double(), x64, labels)

  res = {
      "architecture": name,
      "params": models.count_params(variables["params"]),
      "torch_params": int(sum(p.numel() for p in tm.parameters())),
      "batch": batch,
      "f32_logit_rel_err": rel_err(tl32, jl32),
      "f32_grad_rel_err": rel_err(tg32, jg32),
      "f32_grad_rel_l2": float(np.linalg.norm(tg32 - jg32) / np.linalg.norm(jg32)),
      "f32_labels_agree": bool((tl32.argmax(1) == jl32.argmax(1)).all()),
      "f64_logit_rel_err": rel_err(tl64, jl64),
      "f64_grad_rel_err": rel_err(tg64, jg64),
      # Each float32 gradient against the float64 JAX one: who carries the float32 error.
      "jax_f32_grad_vs_f64": rel_err(jg32, jg64),
      "torch_f32_grad_vs_f64": rel_err(tg32, jg64),
      "max_abs_logit": float(np.abs(jl32).max()),
      "total_s": time.time() - t0,
  }
  res["f32_ok"] = bool(res["f32_logit_rel_err"] < LOGIT_RTOL and res["f32_grad_rel_err"] < GRAD_RTOL
                       and res["f32_labels_agree"])
  res["f64_ok"] = bool(res["f64_logit_rel_err"] < F64_RTOL and res["f64_grad_rel_err"] < F64_RTOL)
  res["ok"] = bool(res["f64_ok"] and res["f32_labels_agree"]
                   and res["f32_logit_rel_err"] < LOGIT_RTOL
                   and res["params"] == res["torch_params"])
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
        f"width 1.0, batch {args.batch}. Errors are max |a - b| / max |b|; float32 tolerances: "
        f"logits {LOGIT_RTOL:g}, input gradients {GRAD_RTOL:g}; float64: {F64_RTOL:g}.",
        flush=True)
  header = (f"{'architecture':<16} {'params':>11} {'f32 logits':>10} {'f32 grad':>9} "
            f"{'(L2)':>8} {'f64 logits':>10} {'f64 grad':>9} {'jax32/64':>9} {'torch32/64':>10} "
            f"{'labels':>6} {'s':>5}  result")
  print(header, flush=True)
  results = []
  with jax.default_matmul_precision("float32"):
    for name in names:
      r = check(name, args.batch)
      results.append(r)
      if r["ok"] and r["f32_ok"]:
        verdict = "ok"
      elif r["ok"]:
        verdict = ("ok (f32 gradient tolerance missed; float64 agrees, so this is float32 "
                   "rounding, see torch32/64 vs jax32/64)")
      else:
        verdict = "FAIL"
      print(f"{name:<16} {r['params']:>11,} {r['f32_logit_rel_err']:>10.1e} "
            f"{r['f32_grad_rel_err']:>9.1e} {r['f32_grad_rel_l2']:>8.1e} "
            f"{r['f64_logit_rel_err']:>10.1e} {r['f64_grad_rel_err']:>9.1e} "
            f"{r['jax_f32_grad_vs_f64']:>9.1e} {r['torch_f32_grad_vs_f64']:>10.1e} "
            f"{'agree' if r['f32_labels_agree'] else 'DIFFER':>6} {r['total_s']:>5.0f}  {verdict}",
            flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  ok = all(r["ok"] for r in results)
  print("all architectures agree" if ok else "SOME ARCHITECTURES DISAGREE", flush=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
