"""Side by side: AutoAttack in JAX (sovr_jax.attacks.autoattack) vs the reference (pyautoattack).

    python scripts/compare_autoattack.py --workdir runs/sovr --n 1000 --device cuda --out cmp.json
    python scripts/compare_autoattack.py --model tiny_mlp --n 200 --fast --out cmp.json
    python scripts/compare_autoattack.py --workdir runs/sovr --n 1000 --worst_case --out t.json
    python scripts/compare_autoattack.py --model preact_resnet18 --n 1000 --batch_size 1000 \
        --worst_case --device cuda --out t.json          # timing without a trained run

Both implementations attack the same model (the training run's Flax model and its PyTorch
export, ``sovr_jax.export``; or the script's ``tiny_mlp``, defined identically in both) on the
same points, with the standard version's settings (APGD-CE 1 restart, APGD-T and FAB-T 9 target
classes, Square 5000 queries, 100 iterations; ``--fast`` lowers them). Printed and written to
``--out``: robust accuracy after each attack for both, their difference, and the time of each
attack for both (the JAX compile time apart).

The reference runs attack by attack as ``AutoAttack(version='custom', attacks=[a])`` on the
points still robust after the previous attacks: the same batches and the same seeding as its
``run_standard_evaluation`` (each attack reseeds torch with the seed), so the per-attack
accuracies and times are those of one standard run.

``--worst_case`` times the case where every point stays robust, so every attack runs in full
(all 9 targets, all 5000 Square queries, all points): both models get +1e4 added to the logit
of class 0 and every label is set to 0, so no attack can succeed, while the network computes
exactly what it computes on real labels. The accuracies of such a run are meaningless (100%);
only the times count. ``--model preact_resnet18`` (random weights, random CIFAR-shaped images)
serves such timings without a training run. ``--attack_dtype bfloat16`` runs the JAX attacks on
the network in bfloat16; every decision is made on the float32 model, and the twin stays float32.
``--skip_jax`` / ``--skip_reference`` run one side only.
JAX does not preallocate GPU memory here (XLA_PYTHON_CLIENT_PREALLOCATE=false), so PyTorch
fits beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to PyTorch

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import torch  # noqa: E402  pylint: disable=wrong-import-position

from sovr_jax import sharding  # noqa: E402  pylint: disable=wrong-import-position
from sovr_jax.attacks import autoattack  # noqa: E402  pylint: disable=wrong-import-position

#: Logit offset of --worst_case (no attack within eps can overcome it).
WORST_CASE_OFFSET = 1e4
FAST = {"n_iter": 20, "n_queries": 300}
STANDARD = {"n_iter": 100, "n_queries": 5000}


# --------------------------------------------------------------------------------------------
# A tiny model defined identically in JAX and PyTorch (for tests and quick comparisons).
# --------------------------------------------------------------------------------------------


def tiny_mlp_params(seed: int = 0, *, shape=(8, 8, 3), hidden: int = 64,
                    num_classes: int = 10) -> dict[str, np.ndarray]:
  """He-initialised weights of a one-hidden-layer ReLU MLP on NHWC images (float32 numpy)."""
  rng = np.random.default_rng(seed)
  d = int(np.prod(shape))
  return {"w1": (rng.standard_normal((d, hidden)) * np.sqrt(2.0 / d)).astype(np.float32),
          "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
          "w2": (rng.standard_normal((hidden, num_classes)) * np.sqrt(2.0 / hidden)
                 ).astype(np.float32),
          "b2": (0.1 * rng.standard_normal(num_classes)).astype(np.float32)}


def tiny_mlp_jax(params: dict[str, np.ndarray]) -> Callable[[jax.Array], jax.Array]:
  """x [N, H, W, C] -> logits: relu(flat(x) w1 + b1) w2 + b2 (flattened in NHWC order)."""
  p = jax.tree.map(jnp.asarray, params)

  def model_fn(x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]
  return model_fn


class TinyMLPTorch(torch.nn.Module):
  """The PyTorch twin of ``tiny_mlp_jax``: takes NCHW, flattens in NHWC order."""

  def __init__(self, params: dict[str, np.ndarray]):
    super().__init__()
    self.fc1 = torch.nn.Linear(*params["w1"].shape)
    self.fc2 = torch.nn.Linear(*params["w2"].shape)
    with torch.no_grad():
      self.fc1.weight.copy_(torch.from_numpy(params["w1"].T.copy()))
      self.fc1.bias.copy_(torch.from_numpy(params["b1"]))
      self.fc2.weight.copy_(torch.from_numpy(params["w2"].T.copy()))
      self.fc2.bias.copy_(torch.from_numpy(params["b2"]))

  def forward(self, x):
    h = torch.relu(self.fc1(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)))
    return self.fc2(h)


def tiny_mlp_data(n: int, seed: int = 0, *, params: dict[str, np.ndarray],
                  shape=(8, 8, 3)) -> tuple[np.ndarray, np.ndarray]:
  """n random NHWC images in [0, 1] labelled by the model itself (clean accuracy 100%)."""
  rng = np.random.default_rng(seed + 1)
  x = rng.uniform(0.0, 1.0, (n,) + tuple(shape)).astype(np.float32)
  y = np.asarray(jnp.argmax(tiny_mlp_jax(params)(jnp.asarray(x)), -1)).astype(np.int64)
  return x, y


# --------------------------------------------------------------------------------------------
# The reference, attack by attack.
# --------------------------------------------------------------------------------------------


def reference_standard(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, eps: float,
                       norm: str, attacks: Sequence[str], seed: int, batch_size: int,
                       device: str, n_iter: int = 100, n_queries: int = 5000,
                       n_target_classes: int = 9, log: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """pyautoattack's standard evaluation, one ``run_standard_evaluation`` per attack.

  x is NHWC (as the JAX side); the torch model gets NCHW. Returns the same summary keys as
  ``autoattack.run_standard`` (robust flags as "robust").
  """
  from pyautoattack import AutoAttack  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger("auto-attack").setLevel(logging.WARNING)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  with torch.no_grad():
    clean_pred = torch.cat([model(xt[i:i + batch_size]).argmax(1)
                            for i in range(0, len(x), batch_size)]).cpu().numpy()
  robust = clean_pred == y
  clean_acc = float(robust.mean())
  targets = max(1, min(n_target_classes, int(model(xt[:1]).shape[-1]) - 1))
  after, times = {}, {}
  x_adv = x.copy()
  for name in attacks:
    idx = np.flatnonzero(robust)
    if len(idx) == 0:
      after[name], times[name] = 0.0, 0.0
      continue
    aa = AutoAttack(model, attacks=[name], device=device, eps=eps,
                    norm={"linf": "Linf", "l2": "L2"}[norm], seed=seed, version="custom")
    aa.verbose = False
    aa.apgd.n_restarts = 1
    aa.fab.n_restarts = 1
    aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    aa.square.n_queries = n_queries
    for att in (aa.apgd, aa.apgd_targeted):  # the checkpoints are set in __init__ from n_iter
      att.n_iter = att.n_iter_orig = n_iter
      att.n_iter_2 = max(int(0.22 * n_iter), 1)
      att.n_iter_min = max(int(0.06 * n_iter), 1)
      att.size_decr = max(int(0.03 * n_iter), 1)
    aa.fab.n_iter = n_iter
    sel = torch.from_numpy(idx).to(device)
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    adv, y_adv = aa.run_standard_evaluation(xt[sel], yt[sel], batch_size=batch_size)
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    times[name] = time.perf_counter() - t0
    broken = (y_adv != yt[sel]).cpu().numpy()
    robust[idx[broken]] = False
    x_adv[idx[broken]] = adv[torch.from_numpy(np.flatnonzero(broken)).to(device)
                             ].permute(0, 2, 3, 1).cpu().numpy()
    after[name] = float(robust.mean())
    log(f"pyautoattack: {name}: {int(broken.sum())} of {len(idx)} points broken; robust "
        f"accuracy after {name.upper()}: {after[name]:.2%} ({times[name]:.2f} s)")
  return {"x_adv": x_adv, "robust": robust,
          "summary": {"clean_acc": clean_acc, "robust_acc": float(robust.mean()),
                      "robust_acc_after": after, "time_s": times, "n": int(len(x)),
                      "eps": float(eps), "norm": norm, "seed": seed, "attacks": list(attacks),
                      "batch_size": batch_size}}


# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------


class _WorstCaseTorch(torch.nn.Module):
  def __init__(self, model: torch.nn.Module):
    super().__init__()
    self.model = model

  def forward(self, x):
    z = self.model(x)
    return z + WORST_CASE_OFFSET * torch.nn.functional.one_hot(
        torch.zeros(z.shape[0], dtype=torch.long, device=z.device), z.shape[-1]).to(z.dtype)


def worst_case_jax(model_fn):
  """The JAX model with +WORST_CASE_OFFSET on class 0 (use with all labels 0)."""

  def fn(x):
    z = model_fn(x)
    return z + WORST_CASE_OFFSET * jax.nn.one_hot(jnp.zeros(z.shape[0], jnp.int32),
                                                  z.shape[-1], dtype=z.dtype)
  return fn


def worst_case_models(model_fn, torch_model):
  """Both models with +WORST_CASE_OFFSET on class 0 (use with all labels 0)."""
  return worst_case_jax(model_fn), _WorstCaseTorch(torch_model).eval()


def random_architecture(name: str, n: int, seed: int, device: str, attack_dtype: str):
  """(model_fn, attack model_fn or None, torch twin, x, y, eps, info): a freshly initialised
  ``sovr_jax.models`` network (CIFAR-10 shapes and normalisation) on uniform random images
  labelled by the JAX model.

  For timing (``--worst_case``): the accuracies of a random network mean nothing.
  """
  # pylint: disable-next=import-outside-toplevel
  from sovr_jax import evaluate, export, models, torch_models
  mean, std, shape = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), (32, 32, 3)
  model = models.get_model(name, num_classes=10, mean=mean, std=std)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape), train=False)
  variables = jax.device_get(variables)
  sd = export.to_state_dict(name, variables["params"], variables.get("batch_stats"), mean=mean,
                            std=std)
  tmodel = torch_models.build_torch_model(name, num_classes=10, mean=mean, std=std,
                                          input_shape=(shape[2],) + shape[:2])
  torch_models.load_weights(tmodel, sd)
  variables = sharding.replicate(jax.tree.map(jnp.asarray, variables), sharding.make_mesh())
  model_fn = evaluate.model_fn_eval(model, variables)
  x = np.random.default_rng(seed + 1).uniform(0, 1, (n,) + shape).astype(np.float32)
  y = np.concatenate([np.asarray(jnp.argmax(model_fn(jnp.asarray(x[i:i + 500])), -1))
                      for i in range(0, n, 500)]).astype(np.int64)
  info = {"model": f"{name} (random init)"}
  return (model_fn, _attack_model_fn(model, variables, attack_dtype), tmodel.to(device).eval(),
          x, y, 8 / 255, info)


def _attack_model_fn(model, variables, attack_dtype: str):
  """The network the JAX attacks run on: None (the model itself) for float32."""
  from sovr_jax import evaluate  # pylint: disable=import-outside-toplevel
  if attack_dtype == "float32":
    return None
  return evaluate.model_fn_eval(model, variables, jnp.dtype(attack_dtype))


def load_workdir(workdir: str, n: int, device: str, checkpoint: str = "best",
                 attack_dtype: str = "float32"):
  """(model_fn, attack model_fn or None, torch twin, x NHWC [n], y [n], eps, info) of a
  sovr_jax training run."""
  from sovr_jax import evaluate, export, torch_models  # pylint: disable=import-outside-toplevel
  run = export.restore_run(workdir, checkpoint=checkpoint)
  ds, cfg = run.dataset, run.cfg
  variables = sharding.replicate(jax.tree.map(jnp.asarray, run.variables), sharding.make_mesh())
  model_fn = evaluate.model_fn_eval(run.model, variables)
  h, w, c = ds.image_shape
  sd = export.to_state_dict(cfg.model.name, run.variables["params"],
                            run.variables["batch_stats"], mean=ds.mean, std=ds.std)
  tmodel = torch_models.build_torch_model(cfg.model.name, num_classes=ds.num_classes,
                                          width=cfg.model.width, mean=ds.mean, std=ds.std,
                                          input_shape=(c, h, w))
  torch_models.load_weights(tmodel, sd)
  tmodel = tmodel.to(device).eval()
  n = min(n, ds.num_test)
  x = ds.test_images[:n].astype(np.float32) / 255.0
  y = ds.test_labels[:n].astype(np.int64)
  info = {"workdir": os.path.abspath(workdir), "checkpoint": checkpoint, "step": run.step,
          "architecture": cfg.model.name, "width": float(cfg.model.width), "dataset": ds.name}
  return (model_fn, _attack_model_fn(run.model, variables, attack_dtype), tmodel, x, y,
          float(cfg.attack.eps), info)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def _parse_eps(text: str) -> float:
  if "/" in text:
    a, b = text.split("/", 1)
    return float(a) / float(b)
  return float(text)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a sovr_jax training run")
  src.add_argument("--model", choices=("tiny_mlp", "preact_resnet18"),
                   help="tiny_mlp: defined in this script; preact_resnet18: randomly initialised "
                        "(timing only)")
  p.add_argument("--attack_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the network the JAX attacks run on (with --workdir or "
                      "--model preact_resnet18); every decision is made on the float32 model")
  p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
  p.add_argument("--n", type=int, default=1000, help="first n test points")
  p.add_argument("--eps", default=None,
                 help="e.g. 8/255; default: the run's (tiny_mlp 0.02, preact_resnet18 8/255)")
  p.add_argument("--norm", default="linf", choices=("linf", "l2"))
  p.add_argument("--batch_size", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--device", default=None, help="torch device (default cuda if available)")
  p.add_argument("--attacks", default=",".join(autoattack.STANDARD_ATTACKS))
  p.add_argument("--fast", action="store_true",
                 help=f"reduced iterations/queries for a quick check ({FAST})")
  p.add_argument("--n_iter", type=int, default=None, help="override APGD/FAB iterations")
  p.add_argument("--n_queries", type=int, default=None, help="override Square queries")
  p.add_argument("--worst_case", action="store_true",
                 help="no point can be broken: every attack runs in full (timing only)")
  p.add_argument("--skip_reference", action="store_true", help="run the JAX side only")
  p.add_argument("--skip_jax", action="store_true", help="run the reference only")
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
  p.add_argument("--matmul_precision", default="default", choices=("default", "highest"),
                 help="default: each library's own GPU default (PyTorch runs convolutions in "
                      "TF32); highest: full float32 in both")
  p.add_argument("--out", default=None, help="JSON output")
  return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  if args.matmul_precision == "highest":
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", "highest")
  attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
  settings = dict(FAST if args.fast else STANDARD)
  if args.n_iter is not None:
    settings["n_iter"] = args.n_iter
  if args.n_queries is not None:
    settings["n_queries"] = args.n_queries

  if args.workdir:
    model_fn, attack_fn, tmodel, x, y, eps, info = load_workdir(
        args.workdir, args.n, device, args.checkpoint, args.attack_dtype)
  elif args.model == "preact_resnet18":
    model_fn, attack_fn, tmodel, x, y, eps, info = random_architecture(
        args.model, args.n, args.seed, device, args.attack_dtype)
  else:
    params = tiny_mlp_params(args.seed)
    if args.attack_dtype != "float32":
      raise ValueError("--attack_dtype needs --workdir or --model preact_resnet18.")
    model_fn, tmodel = tiny_mlp_jax(params), TinyMLPTorch(params).to(device).eval()
    attack_fn = None
    x, y = tiny_mlp_data(args.n, args.seed, params=params)
    eps, info = 0.02, {"model": "tiny_mlp", "input_shape": list(x.shape[1:])}
  if args.eps is not None:
    eps = _parse_eps(args.eps)
  if args.worst_case:
    model_fn, tmodel = worst_case_models(model_fn, tmodel)
    attack_fn = attack_fn and worst_case_jax(attack_fn)
    y = np.zeros_like(y)

  if args.skip_jax and args.skip_reference:
    raise ValueError("--skip_jax and --skip_reference leave nothing to run.")
  ours = None
  if not args.skip_jax:
    print(f"== JAX AutoAttack ({jax.devices()[0].platform}, {len(jax.devices())} device(s))",
          flush=True)
    ours = autoattack.run_standard(model_fn, x, y, args.seed, eps=eps, norm=args.norm,
                                   batch_size=args.batch_size, attacks=attacks,
                                   n_iter=settings["n_iter"], n_queries=settings["n_queries"],
                                   attack_model_fn=attack_fn)
  ref = None
  if not args.skip_reference:
    print(f"== pyautoattack (torch {torch.__version__}, {device})", flush=True)
    ref = reference_standard(tmodel, x, y, eps=eps, norm=args.norm, attacks=attacks,
                             seed=args.seed, batch_size=args.batch_size, device=device,
                             n_iter=settings["n_iter"], n_queries=settings["n_queries"])

  rows = []
  s = ours["summary"] if ours else None
  r = ref["summary"] if ref else None
  header = f"{'attack':<10}{'jax acc':>10}{'ref acc':>10}{'diff':>9}{'jax s':>10}{'ref s':>10}" \
           f"{'speedup':>9}"
  lines = [header, "-" * len(header)]
  def acc(summary, name):
    if summary is None:
      return None
    return summary["clean_acc"] if name == "clean" else summary["robust_acc_after"][name]

  for name in ["clean"] + attacks:
    a, b = acc(s, name), acc(r, name)
    ta = None if (name == "clean" or s is None) else s["time_s"][name]
    tb = None if (name == "clean" or r is None) else r["time_s"][name]
    rows.append({"attack": name, "jax_acc": a, "ref_acc": b,
                 "diff": None if (a is None or b is None) else a - b, "jax_time_s": ta,
                 "ref_time_s": tb,
                 "speedup": (tb / ta) if (ta and tb) else None})
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines.append(f"{name:<10}{fmt(a, '.2%'):>10}{fmt(b, '.2%'):>10}"
                 f"{fmt(rows[-1]['diff'] and 100 * rows[-1]['diff'], '+.1f'):>9}"
                 f"{fmt(ta, '.2f'):>10}{fmt(tb, '.2f'):>10}"
                 f"{fmt(rows[-1]['speedup'], '.1f'):>9}")
  tot_a = sum(s["time_s"].values()) if s else None
  tot_b = sum(r["time_s"].values()) if r else None
  lines.append(f"{'total':<10}{'':>10}{'':>10}{'':>9}"
               f"{'-' if tot_a is None else format(tot_a, '.2f'):>10}"
               f"{'-' if tot_b is None else format(tot_b, '.2f'):>10}"
               f"{'-' if not (tot_a and tot_b) else format(tot_b / tot_a, '.1f'):>9}")
  print("\n".join(lines))
  agree = None
  if ref and ours:
    agree = float(np.mean(ours["robust"] == ref["robust"]))
    print(f"per-point agreement of the final robust flags: {agree:.2%}; JAX compile time "
          f"(excluded above): {sum(s['compile_s'].values()):.1f} s")
  result = {"settings": {**settings, "eps": eps, "norm": args.norm, "n": int(len(x)),
                         "attack_dtype": args.attack_dtype,
                         "batch_size": args.batch_size, "seed": args.seed, "attacks": attacks,
                         "worst_case": args.worst_case, "fast": args.fast, "device": device},
            "model": info, "rows": rows, "jax": s, "reference": r,
            "total_time_s": {"jax": tot_a, "reference": tot_b},
            "robust_flag_agreement": agree,
            "platform": {"jax_backend": jax.default_backend(),
                         "jax_devices": [str(d) for d in jax.devices()],
                         "torch_device": device, "python": platform.python_version(),
                         "jax": jax.__version__, "torch": torch.__version__,
                         "matmul_precision": args.matmul_precision,
                         "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                         "jax_default_matmul_precision":
                             jax.config.jax_default_matmul_precision},
            "command": " ".join(sys.argv)}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
