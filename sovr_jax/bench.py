"""Benchmark of the adversarial train step: JAX per method / architecture / batch /
precision, side by side with the PyTorch twin's eager PGD-10 step, in one run.

    python -m sovr_jax.bench --out results/bench_gpu.json                 # GPU defaults
    python -m sovr_jax.bench --cpu_smoke --out /tmp/bench_cpu.json        # seconds on a CPU
    python -m sovr_jax.bench --epoch --methods "" --torch ""             # the epoch, end to end

For every case it prints images/s (median over repeats, warm-up excluded),
the JAX / PyTorch-eager-float32 ratio at the same architecture and batch, the
achieved TFLOP/s from an analytic FLOP count of one forward pass (2 x the
multiply-adds of every convolution and matmul, counted on the jaxpr) times
(2K + 3) (K attack steps of forward + input gradient, one training
forward + backward), and the fraction of a matmul peak measured in the same run.
``--epoch`` also times a whole training epoch of the trainer itself, end to end
(host batches, on-device augmentation, step, metrics), against the steps alone.
``--xla_flags "A;B"`` runs everything once per set of XLA flags, side by side.
``--profile DIR`` traces a few steps of every JAX case after its timing
(``jax.profiler``) and adds where the device time goes, per kernel class, to
its row (``sovr_jax.profiling``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from sovr_jax import (data, default_config, jsonio, models, profiling, rundir, sharding,
                      train)


def _bench_config(method: str, arch: str, width: float, batch: int, precision: str,
                  num_steps: int, steps_per_dispatch: int, clean_metric: bool = True,
                  fold_bn: bool = False):
  cfg = default_config.get_config(method)
  cfg.train.clean_acc_metric = clean_metric
  cfg.attack.fold_bn = fold_bn
  cfg.model.name, cfg.model.width, cfg.precision = arch, width, precision
  cfg.train.batch_size = batch
  cfg.train.steps_per_dispatch = steps_per_dispatch
  cfg.attack.num_steps = num_steps
  return cfg


def jaxpr_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (a loop's body, a branch), each
  once (a loop body is not multiplied by its trip count)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from jaxpr_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from jaxpr_eqns(sub)


def _jaxpr_flops(jaxpr) -> float:
  """2 x multiply-adds of every convolution and matrix product in a jaxpr
  (recursing into nested jaxprs); element-wise work is not counted."""
  total = 0.0
  for eqn in jaxpr_eqns(jaxpr):
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
      total += 2.0 * math.prod(out.shape) * per_output
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
  return total


def forward_flops(model: Any, variables: Any, image_shape: tuple[int, ...]) -> float:
  """Analytic FLOPs (2 x MACs of convolutions and matmuls) of one forward pass
  of one image, counted on the model's jaxpr."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return _jaxpr_flops(closed.jaxpr)


def matmul_peak(dtype=jnp.bfloat16, n: int | None = None, repeats: int = 10) -> float:
  """Measured TFLOP/s of an n x n matmul (the roofline for the step)."""
  on_gpu = jax.devices()[0].platform != "cpu"
  n = n or (8192 if on_gpu else 1024)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def _timed(fn: Callable[[], Any], *, iters: int, repeats: int, warmup: int = 2) -> float:
  """Median seconds per call of fn over `repeats` timings of `iters` calls."""
  out = None
  for _ in range(warmup):
    out = fn()
  jax.block_until_ready(out)
  samples = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t) / iters)
  return statistics.median(samples)


def bench_jax(method: str, arch: str, *, width: float, batch: int, precision: str,
              num_steps: int, steps_per_dispatch: int, iters: int, repeats: int,
              image_shape=(32, 32, 3), num_classes: int = 10,
              host_batches: bool = False, clean_metric: bool = True,
              fold_bn: bool = False, profile_dir: str | None = None) -> dict[str, Any]:
  """Images/s of the jitted train step (the same step the trainer runs).

  host_batches=True also assembles every batch on the host from a uint8 data
  set (numpy gather + transfer, as the training loop does), to show whether the
  input pipeline costs anything next to the step. ``fold_bn``: attack.fold_bn. With
  ``profile_dir``, three more calls are traced there and read per kernel class (the row's
  "profile"). Every row counts the compiled step's HLO (its "hlo": ``profiling.hlo_census``).
  """
  cfg = _bench_config(method, arch, width, batch, precision, num_steps, steps_per_dispatch,
                      clean_metric, fold_bn)
  mesh = sharding.make_mesh()
  dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
  model = models.get_model(arch, num_classes=num_classes, width=width, dtype=dtype,
                           mean=(0.5,) * image_shape[-1], std=(0.25,) * image_shape[-1])
  schedule = train.make_schedule(cfg, steps_per_epoch=100)
  state = train.create_train_state(jax.random.PRNGKey(0), model, image_shape,
                                   train.make_optimizer(cfg, schedule))
  flops = forward_flops(model, {"params": state.params, "batch_stats": state.batch_stats},
                        image_shape)
  step = train.make_train_step(cfg, steps_per_epoch=100, schedule=schedule)
  k = steps_per_dispatch
  fn = train.jit_train_step(train.make_multi_step(step, k) if k > 1 else step, mesh,
                            stacked=k > 1)
  rng = np.random.default_rng(0)
  n_data = max(4 * batch * k, 2048) if host_batches else batch * k
  images = rng.integers(0, 256, (n_data,) + tuple(image_shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n_data).astype(np.int32)
  shape = (k, batch) if k > 1 else (batch,)
  key = jax.random.PRNGKey(1)
  holder = {"state": sharding.replicate(state, mesh)}
  device_batch = train.put_batch((images[:batch * k].reshape(shape + image_shape),
                                  labels[:batch * k].reshape(shape)), mesh, stacked=k > 1)
  # Compiled once, ahead of time: timed, traced where asked, and its HLO counted (its
  # transposes and copies show a layout that does not suit the convolutions).
  fn = fn.lower(holder["state"], device_batch, key).compile()
  hlo = profiling.hlo_census(fn.as_text())

  def one():
    if host_batches:
      idx = rng.integers(0, n_data, batch * k)
      b = train.put_batch((images[idx].reshape(shape + image_shape), labels[idx].reshape(shape)),
                          mesh, stacked=k > 1)
    else:
      b = device_batch
    holder["state"], m = fn(holder["state"], b, key)
    return m["loss"]

  sec = _timed(one, iters=max(1, iters // k), repeats=repeats)
  ips = batch * k / sec
  # Forward equivalents per image (backward = 2 forwards): K attack steps of forward +
  # input gradient, the training forward + backward, and the metric's clean forward.
  passes = 2 * num_steps + 2 + (1 if clean_metric else 0)
  prof = {"hlo": hlo}
  if profile_dir:
    case = (f"{arch}_{method}_b{batch}_{precision}_k{k}"
            f"{'_host' if host_batches else ''}{'' if clean_metric else '_noclean'}"
            f"{'_fold' if fold_bn else ''}")
    prof["profile"] = profiling.profile(one, logdir=os.path.join(profile_dir, case), steps=3)
    print(f"profile of {case}:\n{profiling.format_table(prof['profile'])}\n"
          f"compiled step: {json.dumps(prof['hlo'])}", flush=True)
  return {**prof, "framework": "jax", "method": method, "arch": arch, "width": width, "batch": batch,
          "precision": precision, "attack_steps": num_steps, "steps_per_dispatch": k,
          "host_batches": host_batches, "clean_acc_metric": clean_metric, "fold_bn": fold_bn,
          "images_per_s": ips,
          "gflop_per_image": flops * passes / 1e9, "tflops": ips * flops * passes / 1e12}


def bench_epoch(arch: str, *, width: float, batch: int, precision: str, num_steps: int,
                num_images: int, iters: int, repeats: int) -> dict[str, Any]:
  """A PGD-AT training epoch end to end against its steps alone.

  Runs the trainer itself (``experiment.train_and_evaluate``: host-side batches,
  on-device augmentation, the step, metrics fetched every ``log_every_steps``) for
  two epochs of ``num_images`` synthetic CIFAR-shaped images and takes the second
  epoch's time (no compilation in it); steps-only is the number of steps times the
  median time of the same jitted step on a batch already on the device
  (:func:`bench_jax`). ``overhead`` = epoch / steps-only - 1.
  """
  from sovr_jax import experiment  # pylint: disable=g-import-not-at-top
  cfg = _bench_config("pgd_at", arch, width, batch, precision, num_steps, 1)
  cfg.data.source, cfg.data.name, cfg.data.val_size = "synthetic", "cifar10", 0
  cfg.data.num_train, cfg.data.num_test = num_images, batch
  cfg.train.epochs, cfg.train.lr_boundaries = 2, ()
  cfg.eval.every_epochs, cfg.eval.pgd_steps, cfg.eval.cw_steps = 0, 1, 1
  cfg.eval.margin_examples = batch
  with tempfile.TemporaryDirectory() as workdir:
    experiment.train_and_evaluate(cfg, workdir)
    epochs = [r for r in rundir.read_metrics(workdir) if "epoch_time_s" in r]
  steps = data.num_batches(num_images, batch)
  step = bench_jax("pgd_at", arch, width=width, batch=batch, precision=precision,
                   num_steps=num_steps, steps_per_dispatch=1, iters=iters, repeats=repeats)
  epoch_s, steps_s = epochs[-1]["epoch_time_s"], steps * batch / step["images_per_s"]
  return {"framework": "jax", "method": "pgd_at", "arch": arch, "width": width, "batch": batch,
          "precision": precision, "attack_steps": num_steps, "epoch_images": steps * batch,
          "epoch_s": epoch_s, "steps_only_s": steps_s,
          "images_per_s": steps * batch / epoch_s,
          "steps_only_images_per_s": step["images_per_s"], "overhead": epoch_s / steps_s - 1}


def bench_torch(arch: str, *, width: float, batch: int, amp: bool, num_steps: int,
                iters: int, repeats: int, image_shape=(32, 32, 3),
                num_classes: int = 10) -> dict[str, Any]:
  """Images/s of the reference-style eager PyTorch PGD-AT step on the twin.

  model.eval() during the attack, sign-gradient PGD, then model.train() and
  SGD on CE; amp=True wraps forwards in bfloat16 autocast with channels-last.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from sovr_jax import torch_models  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  h, w, c = image_shape
  model = torch_models.build_torch_model(arch, num_classes=num_classes, width=width,
                                         mean=(0.5,) * c, std=(0.25,) * c,
                                         input_shape=(c, h, w)).to(dev)
  fmt = torch.channels_last if amp else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.rand(batch, c, h, w, device=dev).to(memory_format=fmt)
  y = torch.randint(0, num_classes, (batch,), device=dev)
  eps, alpha = 8 / 255, 2 / 255

  def forward(v):
    if amp:
      with torch.autocast(dev, dtype=torch.bfloat16):
        return model(v).float()
    return model(v)

  def step():
    model.eval()
    delta = torch.empty_like(x).uniform_(-eps, eps)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(num_steps):
      x_adv.requires_grad_(True)
      loss = F.cross_entropy(forward(x_adv), y)
      grad, = torch.autograd.grad(loss, x_adv)
      x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps)
      x_adv = x_adv.clamp(0, 1)
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x_adv), y)
    loss.backward()
    opt.step()
    return loss

  def sync_step():
    out = step()
    if dev == "cuda":
      torch.cuda.synchronize()
    return out

  for _ in range(2):
    sync_step()
  samples = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      step()
    if dev == "cuda":
      torch.cuda.synchronize()
    samples.append((time.perf_counter() - t) / iters)
  return {"framework": "torch", "method": "pgd_at", "arch": arch, "width": width,
          "batch": batch, "precision": "bf16-autocast+channels_last" if amp else "float32",
          "attack_steps": num_steps, "images_per_s": batch / statistics.median(samples),
          "torch": torch.__version__, "device": dev}


def _per_flag_set(argv: list[str], a: argparse.Namespace) -> list[dict[str, Any]]:
  """``main`` once per set of ``--xla_flags``, each in a subprocess with XLA_FLAGS set to it
  (added to the caller's), every row labelled with its set; the rows go to ``--out``."""
  sets = a.xla_flags.split(";")
  inner = [x for i, x in enumerate(argv) if not (
      x.startswith("--xla_flags=") or x == "--xla_flags"
      or (i > 0 and argv[i - 1] == "--xla_flags") or x.startswith("--out=") or x == "--out"
      or (i > 0 and argv[i - 1] == "--out"))]
  out: dict[str, Any] = {"header": None, "rows": [], "command": rundir.command()}
  with tempfile.TemporaryDirectory() as tmp:
    for i, flags in enumerate(sets):
      part = os.path.join(tmp, f"{i}.json")
      env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
      print(f"=== XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
      proc = subprocess.run([sys.executable, "-m", "sovr_jax.bench", *inner, "--out", part],
                            env=env, check=False)
      got = {"header": None, "rows": []}
      if os.path.exists(part):
        with open(part, encoding="utf-8") as f:
          got = json.load(f)
      if proc.returncode != 0:
        got["rows"].append({"error": f"exit status {proc.returncode}"})
      out["header"] = out["header"] or got["header"]
      out["rows"] += [{**r, "xla_flags": flags} for r in got["rows"]]
      if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        jsonio.write_json_atomic(a.out, out)
  return out["rows"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--archs", default="preact_resnet18")
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--batches", default="128,512")
  p.add_argument("--precisions", default="bfloat16,float32")
  p.add_argument("--methods", default="pgd_at,sovr,trades,mart,mail_at,gairat")
  p.add_argument("--dispatch", default="1", help="steps per dispatch (lax.scan), e.g. 1,4")
  p.add_argument("--attack_steps", type=int, default=10)
  p.add_argument("--clean_metric", default="on",
                 help="on,off: the step with and without its clean_acc metric (an eval-mode "
                      "forward; train.clean_acc_metric), side by side")
  p.add_argument("--fold_bn", default="off",
                 help="off,on: the step with and without BatchNorm folded into the "
                      "convolutions during the attack (attack.fold_bn), side by side")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--torch", default="float32,amp", help="PyTorch variants ('' = none)")
  p.add_argument("--host_batches", action="store_true",
                 help="also time the pgd_at step with host-side batch assembly")
  p.add_argument("--epoch", action="store_true",
                 help="also time a PGD-AT training epoch end to end against its steps alone")
  p.add_argument("--epoch_images", type=int, default=50000,
                 help="--epoch: images per epoch (default: CIFAR-10's 50,000)")
  p.add_argument("--profile", default="", metavar="DIR",
                 help="trace 3 steps of every JAX case into DIR/<case> and add the device "
                      "time per kernel class to its row")
  p.add_argument("--cpu_smoke", action="store_true",
                 help="tiny sizes for a CPU: width 1/16, batch 32, PGD-2, float32, "
                 "256-image epochs (and, unless given, 2x2 timings and dispatch 1,2)")
  p.add_argument("--xla_flags", default=None, metavar="SET;SET",
                 help="run everything once per set of XLA flags, each in its own process "
                      "(XLA reads them at start), side by side; an empty set is XLA's "
                      "defaults, e.g. ';--xla_gpu_autotune_level=0'")
  p.add_argument("--out", default="")
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--cpu_smoke" in argv:  # sizes forced below; timings and dispatch only by default
    p.set_defaults(iters=2, repeats=2, dispatch="1,2")
  a = p.parse_args(argv)
  if a.xla_flags is not None:
    return _per_flag_set(argv, a)
  if a.cpu_smoke:
    a.width, a.batches, a.attack_steps = 0.0625, "32", 2
    a.precisions, a.epoch_images = "float32", 256
  dev = jax.devices()[0]
  peak_dtype = jnp.bfloat16 if dev.platform != "cpu" else jnp.float32
  peak = matmul_peak(peak_dtype)
  # The provenance every result file records (versions, devices, CPU, host, command, time),
  # with torch's version when its rows run. (Files before 2026-12-02 had only "jax" and
  # "python" beside the device.)
  header = {"platform": dev.platform, "num_devices": jax.device_count(),
            "matmul_peak_tflops": peak, "matmul_peak_dtype": jnp.dtype(peak_dtype).name,
            **rundir.provenance(*(("torch",) if a.torch else ()))}
  print(json.dumps(header), flush=True)
  rows = []
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

  last = [time.perf_counter()]

  def emit(row):  # rewrites --out after every row: a timeout keeps what finished
    now = time.perf_counter()  # the case's wall time, compilation and profile included
    row["case_s"], last[0] = round(now - last[0], 3), now
    rows.append(row)
    print(json.dumps(row), flush=True)
    if a.out:
      jsonio.write_json_atomic(a.out, {"header": header, "rows": rows,
                                       "command": header["command"]})

  torch_ref: dict[tuple[str, int], float] = {}
  for arch in a.archs.split(","):
    for batch in [int(b) for b in a.batches.split(",")]:
      for variant in [v for v in a.torch.split(",") if v]:
        try:
          r = bench_torch(arch, width=a.width, batch=batch, amp=variant == "amp",
                          num_steps=a.attack_steps, iters=max(2, a.iters // 4),
                          repeats=a.repeats)
        except Exception as e:  # pylint: disable=broad-except
          r = {"framework": "torch", "arch": arch, "batch": batch, "variant": variant,
               "error": f"{type(e).__name__}: {e}"}
        if variant == "float32" and "images_per_s" in r:
          torch_ref[(arch, batch)] = r["images_per_s"]
        emit(r)
      for precision in a.precisions.split(","):
        for k in [int(d) for d in a.dispatch.split(",")]:
          for method in [m for m in a.methods.split(",") if m]:
            for clean, fold in itertools.product(
                [c == "on" for c in a.clean_metric.split(",")],
                [f == "on" for f in a.fold_bn.split(",")]):
              r = bench_jax(method, arch, width=a.width, batch=batch, precision=precision,
                            num_steps=a.attack_steps, steps_per_dispatch=k, iters=a.iters,
                            repeats=a.repeats, clean_metric=clean, fold_bn=fold,
                            profile_dir=a.profile or None)
              r["fraction_of_peak"] = r["tflops"] / peak
              if (arch, batch) in torch_ref:
                r["ratio_vs_torch_eager_f32"] = r["images_per_s"] / torch_ref[(arch, batch)]
              emit(r)
        if a.host_batches:
          r = bench_jax("pgd_at", arch, width=a.width, batch=batch, precision=precision,
                        num_steps=a.attack_steps, steps_per_dispatch=1, iters=a.iters,
                        repeats=a.repeats, host_batches=True)
          emit(r)
        if a.epoch:
          emit(bench_epoch(arch, width=a.width, batch=batch, precision=precision,
                           num_steps=a.attack_steps, num_images=a.epoch_images,
                           iters=a.iters, repeats=a.repeats))
  return rows


if __name__ == "__main__":
  main()
