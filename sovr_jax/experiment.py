"""The training loop: data -> jitted sharded steps -> validation -> checkpoints -> report.

``train_and_evaluate(config, workdir)`` writes into ``workdir``:
  config.json       the full config (and the fields a resume must match)
  metrics.jsonl     one line per log interval and one per epoch
  checkpoints/      latest checkpoints (Orbax), best/ the best by validation
  report.json       test-set clean / PGD-20 / CW-20 of the best and final
                    models, the config, seed, versions and timings
  margins.png       adversarial logit-margin histogram of training examples
  margins.json      those margins, one per example, and SOVR's small-margin flags
Running the same command again resumes from the newest readable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sovr_jax import (checkpoint, config_lib, data, evaluate, jsonio, losses, methods,
                      models, sharding, train)

UPPER_BOUND_NOTE = ("PGD-20 and CW-20 accuracies are upper bounds on robust accuracy; the "
                    "robustness figure is AutoAttack's (python -m sovr_jax.autoattack_eval).")


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last checkpoint."""


def _is_main() -> bool:
  return jax.process_index() == 0


def _log(msg: str) -> None:
  """Prints on process 0 only (one line per run, not one per host)."""
  if _is_main():
    print(msg, flush=True)


def _write_json(path: str, obj: Any) -> None:
  """Atomic JSON write, from process 0 only."""
  if _is_main():
    jsonio.write_json_atomic(path, obj)


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "numpy"):
    try:
      out[mod] = __import__(mod, fromlist=["__version__"]).__version__
    except (ImportError, AttributeError):
      pass
  return out


def load_data(cfg: ml_collections.ConfigDict) -> data.Dataset:
  d = cfg.data
  return data.load_dataset(
      d.name, source=d.source, data_dir=d.data_dir or None, path=d.path or None,
      val_size=d.val_size, seed=cfg.seed, cache_dir=d.cache_dir or None,
      num_train=d.num_train or None, num_test=d.num_test or None)


def build_model(cfg: ml_collections.ConfigDict, ds: data.Dataset):
  dtype = jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32
  return models.get_model(cfg.model.name, num_classes=ds.num_classes, width=cfg.model.width,
                          dtype=dtype, mean=ds.mean, std=ds.std)


def eval_step_size(cfg: ml_collections.ConfigDict) -> float:
  return cfg.eval.step_size or cfg.attack.eps / 4


def _check_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run of another model/data set/method."""
  path = os.path.join(workdir, "config.json")
  sig = config_lib.model_signature(cfg)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f).get("signature", {})
    diff = {k: (old.get(k), v) for k, v in sig.items() if old.get(k) != v}
    if diff:
      desc = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
      raise ValueError(f"Workdir {workdir} holds a run of a different model or setup ({desc}). "
                       f"Use a new --workdir, or delete {workdir} to start over.")
  _write_json(path, {"signature": sig, "config": cfg.to_dict()})


def _truncate_metrics(path: str, step: int) -> None:
  """On resume, drops metric lines written after the restored checkpoint."""
  if not (_is_main() and os.path.exists(path)):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)


class _MetricsWriter:
  def __init__(self, path: str):
    self.path = path
    self._tb = None
    if _is_main():
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard"))
      except ImportError:
        pass

  def write(self, record: dict[str, Any]) -> None:
    if not _is_main():
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=jsonio.to_jsonable) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "epoch"):
          self._tb.add_scalar(k, v, record.get("step", 0))
      self._tb.flush()


def _progress(total: int, initial: int, desc: str):
  """A tqdm bar on process 0; None elsewhere (tqdm.write prints even when disabled)."""
  if not _is_main():
    return None
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)
  except ImportError:
    return None


def margin_groups(margins: np.ndarray, batch_size: int, fraction: float) -> np.ndarray:
  """SOVR's selection replayed on evaluation margins: in consecutive batches of
  ``batch_size``, the ceil(fraction * n) smallest margins are "small-margin"."""
  mask = np.zeros(len(margins), bool)
  for start in range(0, len(margins), batch_size):
    m = margins[start:start + batch_size]
    k = losses.num_switched(len(m), fraction)
    mask[start + np.argsort(m, kind="stable")[:k]] = True
  return mask


def plot_margins(path: str, margins: np.ndarray, small: np.ndarray, title: str) -> dict:
  """Histogram of adversarial logit margins, small-margin vs other examples."""
  lo, hi = float(np.percentile(margins, 0.5)), float(np.percentile(margins, 99.5))
  bins = np.linspace(min(lo, -1.0), max(hi, 1.0), 61)
  hist = {"bins": bins.tolist(),
          "small_margin": np.histogram(margins[small], bins)[0].tolist(),
          "other": np.histogram(margins[~small], bins)[0].tolist()}
  if _is_main():
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(margins[~small], bins, alpha=0.7, label="other examples")
    ax.hist(margins[small], bins, alpha=0.7, label="small-margin (SOVR's switched set)")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("adversarial logit margin  z_y - max_{k!=y} z_k")
    ax.set_ylabel("training examples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return hist


@dataclasses.dataclass
class _Pending:
  """Device metrics not yet fetched, so the host never waits per step: one
  entry per dispatch, (first step, metrics of shape [] or [steps])."""
  entries: list = dataclasses.field(default_factory=list)

  def add(self, first_step: int, metrics: dict) -> None:
    self.entries.append((first_step, metrics))

  def fetch(self) -> list[tuple[int, dict[str, float]]]:
    """Per-step (step, {name: value}) on the host; clears the buffer."""
    out = []
    for first, m in jax.device_get(self.entries):
      m = {k: np.atleast_1d(v) for k, v in m.items()}
      for i in range(len(next(iter(m.values())))):
        out.append((first + i, {k: float(v[i]) for k, v in m.items()}))
    self.entries.clear()
    return out


def _grouped(iterator, k: int):
  """Consecutive groups of k items (the last one may be shorter)."""
  group = []
  for item in iterator:
    group.append(item)
    if len(group) == k:
      yield group
      group = []
  if group:
    yield group


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``cfg`` in ``workdir`` (resuming if it holds a checkpoint) and
  returns the report that it also writes to ``workdir/report.json``."""
  t_start = time.time()
  config_lib.validate(cfg)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir(cfg, workdir)

  ds = load_data(cfg)
  mesh = sharding.make_mesh()
  t = cfg.train
  sharding.check_batch_size(t.batch_size, mesh, "train.batch_size")
  steps_per_epoch = data.num_batches(ds.num_train, t.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={t.batch_size} is larger than the training split "
                     f"({ds.num_train} examples); lower it.")
  model = build_model(cfg, ds)
  schedule = train.make_schedule(cfg, steps_per_epoch)
  tx = train.make_optimizer(cfg, schedule)
  root = jax.random.PRNGKey(cfg.seed)
  init_rng, step_rng, eval_rng = jax.random.split(root, 3)
  try:
    state = train.create_train_state(init_rng, model, ds.image_shape, tx)
  except (ZeroDivisionError, ValueError, TypeError) as e:
    raise ValueError(
        f"model.name={cfg.model.name!r} cannot take {ds.name} images of shape "
        f"{ds.image_shape} ({type(e).__name__}: {e}). SmallCNN needs at least 16x16 inputs; "
        f"pick another model.name or data set.") from e
  start_epoch = methods.reweight_start_epoch(cfg.method, cfg, t.epochs)

  # Replicated before the restore, so that Orbax reads the checkpoint straight into
  # the global arrays (on every process when there are several).
  state = sharding.replicate(state, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep)
  meta = {"epoch": 0, "best_val_pgd": -1.0, "best_epoch": -1}
  restored = ckpt.restore(state)
  if restored is not None:
    state, meta = restored
    _log(f"Resumed from {workdir} at step {int(state.step)} (epoch {meta['epoch']}).")
  first_epoch = int(meta["epoch"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  _truncate_metrics(metrics_path, int(state.step))
  writer = _MetricsWriter(metrics_path)

  state = sharding.replicate(state, mesh)  # a no-op unless the restore changed shardings
  step = train.make_train_step(cfg, steps_per_epoch=steps_per_epoch, schedule=schedule,
                               reweight_start_epoch=start_epoch)
  k = t.steps_per_dispatch
  single_fn = train.jit_train_step(step, mesh)
  multi_fn = train.jit_train_step(train.make_multi_step(step, k), mesh, stacked=True)
  eval_bs = min(cfg.eval.batch_size, max(ds.num_val, ds.num_test, 1))
  eval_bs = max(mesh.devices.size, eval_bs - eval_bs % mesh.devices.size)
  val_eval = evaluate.Evaluator(model, mesh=mesh, eps=cfg.attack.eps,
                                step_size=eval_step_size(cfg), norm=cfg.attack.norm,
                                pgd_steps=cfg.eval.pgd_steps, cw_steps=0, batch_size=eval_bs)
  hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
  _log(f"{cfg.method} | {cfg.model.name} (width {cfg.model.width}, "
       f"{models.count_params(state.params):,} params) | {ds.name}: {ds.num_train} train / "
       f"{ds.num_val} val / {ds.num_test} test | {mesh.devices.size} {jax.devices()[0].platform} "
       f"device(s){hosts} | {steps_per_epoch} steps/epoch")

  pending = _Pending()
  train_time = 0.0
  total_steps = t.epochs * steps_per_epoch
  bar = _progress(total_steps, int(state.step), f"{cfg.method}")

  def flush(epoch: int) -> None:
    """Fetches pending metrics of (1-based) ``epoch``, stops on NaN, logs their means."""
    values = pending.fetch()
    if not values:
      return
    for s, v in values:
      if not (math.isfinite(v["loss"]) and math.isfinite(v["grad_norm"])):
        raise TrainingDivergedError(
            f"Non-finite loss at step {s} (epoch {epoch}): loss={v['loss']}, "
            f"grad_norm={v['grad_norm']}. Nothing after the last good checkpoint "
            f"(step {ckpt.latest_step()}, in {workdir}/checkpoints) was saved. Lower "
            f"train.lr, use precision=float32, or check the data, then rerun the same "
            f"command to resume.")
    mean = {name: float(np.mean([v[name] for _, v in values])) for name in values[0][1]}
    writer.write({"step": values[-1][0] + 1, "epoch": epoch, **mean})
    if bar is not None:
      bar.set_postfix(loss=f"{mean['loss']:.3f}", adv=f"{mean['adv_acc']:.3f}",
                      lr=f"{mean['lr']:.3g}", refresh=False)

  for epoch in range(first_epoch, t.epochs):
    t0 = time.time()
    step = int(state.step)
    batches = data.iterate_batches(ds.train_images, ds.train_labels, t.batch_size,
                                   rng_seed=cfg.seed, epoch=epoch)
    for group in _grouped(batches, k):
      if len(group) == k and k > 1:
        stacked = (np.stack([b[0] for b in group]), np.stack([b[1] for b in group]))
        state, m = multi_fn(state, train.put_batch(stacked, mesh, stacked=True), step_rng)
        pending.add(step, m)
      else:
        for b in group:
          state, m = single_fn(state, train.put_batch(b, mesh), step_rng)
          pending.add(step, m)
      before, step = step, step + len(group)
      if step // t.log_every_steps > before // t.log_every_steps:
        flush(epoch + 1)
      if bar is not None:
        bar.update(len(group))
    flush(epoch + 1)
    jax.block_until_ready(state)
    epoch_time = time.time() - t0
    train_time += epoch_time
    record = {"step": step, "epoch": epoch + 1, "epoch_time_s": epoch_time,
              "images_per_s": steps_per_epoch * t.batch_size / epoch_time}
    is_best = False
    last = epoch + 1 == t.epochs
    if ds.num_val and cfg.eval.every_epochs and ((epoch + 1) % cfg.eval.every_epochs == 0
                                                 or last):
      variables = {"params": state.params, "batch_stats": state.batch_stats}
      v = val_eval(variables, ds.val_images, ds.val_labels, seed=cfg.seed)
      record.update({"val_clean_acc": v["clean_acc"], "val_pgd_acc": v["pgd_acc"]})
      if v["pgd_acc"] > meta["best_val_pgd"]:
        meta.update(best_val_pgd=v["pgd_acc"], best_epoch=epoch + 1)
        is_best = True
    writer.write(record)
    meta["epoch"] = epoch + 1
    if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or last or is_best:
      ckpt.save(state, dict(meta), best=is_best)
    if bar is not None:
      bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record.items()))
  if bar is not None:
    bar.close()

  report = _final_report(cfg, workdir, ds, model, mesh, state, ckpt, meta, eval_bs, eval_rng)
  report["timings"] = {"train_s": train_time, "total_s": time.time() - t_start,
                       "steps_per_epoch": steps_per_epoch}
  _write_json(os.path.join(workdir, "report.json"), report)
  return report


def _final_report(cfg, workdir, ds, model, mesh, state, ckpt, meta, eval_bs, eval_rng):
  """Test-set evaluation of the final and best-by-validation models, margins."""
  t0 = time.time()
  test = evaluate.Evaluator(model, mesh=mesh, eps=cfg.attack.eps, step_size=eval_step_size(cfg),
                            norm=cfg.attack.norm, pgd_steps=cfg.eval.pgd_steps,
                            cw_steps=cfg.eval.cw_steps, batch_size=eval_bs)
  seed = int(jax.random.randint(eval_rng, (), 0, 2**30))
  final_vars = {"params": state.params, "batch_stats": state.batch_stats}
  results = {}
  final = test(final_vars, ds.test_images, ds.test_labels, seed=seed)
  final.pop("pgd_margins")
  results["final"] = {"epoch": meta["epoch"], **final}
  try:
    best = (None if meta["best_epoch"] == meta["epoch"]  # the final model is the best one
            else ckpt.restore(jax.device_get(state), best=True))
  except checkpoint.CheckpointError as e:
    _log(f"WARNING: the best checkpoint could not be read ({e}); reporting the final model "
         "only.")
    best = None
  if best is None and meta["best_epoch"] == meta["epoch"]:
    results["best"] = {"epoch": meta["best_epoch"], "val_pgd_acc": meta["best_val_pgd"],
                       **final}
  elif best is not None:
    best_state, best_meta = best
    r = test({"params": best_state.params, "batch_stats": best_state.batch_stats},
             ds.test_images, ds.test_labels, seed=seed)
    r.pop("pgd_margins")
    results["best"] = {"epoch": best_meta["best_epoch"],
                       "val_pgd_acc": best_meta["best_val_pgd"], **r}
  # Margin histogram on training examples under the training attack.
  n = min(cfg.eval.margin_examples, ds.num_train)
  margin_eval = evaluate.Evaluator(model, mesh=mesh, eps=cfg.attack.eps,
                                   step_size=cfg.attack.step_size, norm=cfg.attack.norm,
                                   pgd_steps=cfg.attack.num_steps, cw_steps=0,
                                   batch_size=max(mesh.devices.size,
                                                  min(eval_bs, cfg.train.batch_size)))
  margins = margin_eval(final_vars, ds.train_images[:n], ds.train_labels[:n],
                        seed=seed)["pgd_margins"]
  small = margin_groups(margins, cfg.train.batch_size, cfg.sovr.ovr_fraction)
  _write_json(os.path.join(workdir, "margins.json"),
             {"margins": np.round(margins, 4).tolist(), "small_margin": small.tolist(),
              "n": n, "attack": f"PGD-{cfg.attack.num_steps}"})
  hist = plot_margins(os.path.join(workdir, "margins.png"), margins, small,
                      f"{cfg.method}, {ds.name}, {n} training examples, PGD-"
                      f"{cfg.attack.num_steps} eps={cfg.attack.eps:.4g}")
  return {
      "method": cfg.method,
      "dataset": ds.name,
      "model": {"name": cfg.model.name, "width": cfg.model.width,
                "params": models.count_params(state.params)},
      "seed": cfg.seed,
      "eps": cfg.attack.eps,
      "test": results,
      "note": UPPER_BOUND_NOTE,
      "margins": {"n": n, "mean": float(margins.mean()),
                  "mean_small_margin": float(margins[small].mean()),
                  "mean_other": float(margins[~small].mean()) if (~small).any() else None,
                  "histogram": hist},
      "config": cfg.to_dict(),
      "versions": versions(),
      "devices": [str(d) for d in jax.devices()],
      "command": " ".join(sys.argv),
      "eval_s": time.time() - t0,
  }
