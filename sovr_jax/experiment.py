"""The training loop: data -> jitted sharded steps -> validation -> checkpoints -> report.

``train_and_evaluate(config, workdir)`` writes the files of ``sovr_jax.rundir`` into
``workdir``: config.json, metrics.jsonl (and TensorBoard summaries), checkpoints/ and best/,
then the report (``sovr_jax.report``): report.json, margins.json, margins.png.

Order of a start, so that a bad input never touches the workdir: validate the config, load
the data, check the sizes, build the model; only then lock the workdir, write (or check) its
config.json and restore the newest readable checkpoint. Running the same command again
resumes; see docs/reliability.md for what survives what.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sovr_jax import (checkpoint, config_lib, data, evaluate, jsonio, methods, metric_writers,
                      models, report, rundir, sharding, signals, train)
from sovr_jax.errors import (CheckpointError, ConfigError, Interrupted, TrainingDivergedError,
                             WorkdirError)

def _is_main() -> bool:
  return jax.process_index() == 0


def _log(msg: str) -> None:
  """Prints on process 0 only (one line per run, not one per host)."""
  if _is_main():
    print(msg, flush=True)


def load_data(cfg: ml_collections.ConfigDict) -> data.Dataset:
  d = cfg.data
  return data.load_dataset(
      d.name, source=d.source, data_dir=d.data_dir or None, path=d.path or None,
      val_size=d.val_size, seed=cfg.seed, cache_dir=d.cache_dir or None,
      num_train=d.num_train or None, num_test=d.num_test or None, download=d.download)


def build_model(cfg: ml_collections.ConfigDict, ds: data.Dataset, dtype: Any = None):
  """The Flax model of ``cfg`` for ``ds`` (compute dtype: cfg.precision unless given)."""
  if dtype is None:
    dtype = jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32
  return models.get_model(cfg.model.name, num_classes=ds.num_classes, width=cfg.model.width,
                          dtype=dtype, mean=ds.mean, std=ds.std)


def init_state(cfg: ml_collections.ConfigDict, model: Any, ds: data.Dataset, tx: Any,
               rng: jax.Array) -> train.TrainState:
  """The initial train state; a model that cannot take the images is a ConfigError.

  Images too small for the model's valid convolutions and poolings leave a layer with no input:
  older jax raises while initialising it (a fan-in of 0), jax 0.11 returns an empty parameter,
  so both are checked.
  """
  def cannot_take(why: str) -> ConfigError:
    return ConfigError(
        f"model.name={cfg.model.name!r} cannot take {ds.name} images of shape "
        f"{ds.image_shape} ({why}). SmallCNN needs at least 16x16 inputs; "
        f"pick another model.name or data set.")
  try:
    state = train.create_train_state(rng, model, ds.image_shape, tx)
  except (ZeroDivisionError, ValueError, TypeError) as e:
    raise cannot_take(f"{type(e).__name__}: {e}") from e
  empty = [jax.tree_util.keystr(path, simple=True, separator="/")
           for path, x in jax.tree_util.tree_leaves_with_path(state.params) if x.size == 0]
  if empty:
    raise cannot_take(f"empty parameters: {', '.join(empty)}")
  return state


def _progress(total: int, initial: int, desc: str):
  """A tqdm bar on process 0; None elsewhere (tqdm.write prints even when disabled)."""
  if not _is_main():
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)


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


@dataclasses.dataclass
class _Setup:
  """Everything checked and built before the workdir is touched."""
  ds: data.Dataset
  mesh: jax.sharding.Mesh
  model: Any
  schedule: Any
  state: train.TrainState
  steps_per_epoch: int
  rngs: tuple[jax.Array, jax.Array]  # (step rng, eval rng)


def _prepare(cfg: ml_collections.ConfigDict) -> _Setup:
  config_lib.validate(cfg)
  ds = load_data(cfg)
  mesh = sharding.make_mesh()
  t = cfg.train
  sharding.check_batch_size(t.batch_size, mesh, "train.batch_size")
  steps_per_epoch = data.num_batches(ds.num_train, t.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f"Config field 'train.batch_size': {t.batch_size} is larger than the "
                      f"training split ({ds.num_train} examples of {ds.name}); lower it.")
  if cfg.eval.every_epochs and ds.num_val == 0:
    _log("Note: data.val_size=0, so no validation split chooses a best checkpoint; the "
         "report's best model is the final one.")
  model = build_model(cfg, ds)
  schedule = train.make_schedule(cfg, steps_per_epoch)
  tx = train.make_optimizer(cfg, schedule)
  init_rng, step_rng, eval_rng = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
  state = init_state(cfg, model, ds, tx, init_rng)
  return _Setup(ds, mesh, model, schedule, state, steps_per_epoch, (step_rng, eval_rng))


def resume_hazards(cfg: ml_collections.ConfigDict,
                   diff: dict[str, tuple[Any, Any]]) -> dict[str, str]:
  """The changes a resume usually may make (``rundir.RESUMABLE_FIELDS``) that would change
  this run (``cfg``, the new config) beyond its new length, each with the reason:

  * ``train.epochs`` under the cosine schedule, which spans the run: its lr would jump;
  * ``train.epochs`` for MAIL / GAIRAT with the default reweighting start, which is a share
    of the epochs: it would stop reweighting and start again later.

  A new validation attack (``eval.pgd_steps``, ``eval.step_size``) is no hazard: the resume
  scores the best checkpoint again with it (``_rescore_best``).
  """
  out = {}
  if "train.epochs" in diff:
    (before, after), why = diff["train.epochs"], []
    if cfg.train.schedule == "cosine":
      why.append("the cosine schedule spans train.epochs, so its lr would jump at the resume")
    first, moved = (methods.reweight_start_epoch(cfg.method, cfg, int(e))
                    for e in (before, after))
    if first != moved:
      sec = "gairat" if cfg.method == "gairat" else "mail"
      why.append(f"{cfg.method}'s reweighting starts at a share of train.epochs (0-based "
                 f"epoch {first} of {before}, {moved} of {after}); to keep it where it was, "
                 f"also pass --config.{sec}.start_epoch={first} --allow_change={sec}.start_epoch")
    if why:
      out["train.epochs"] = "; ".join(why)
  return out


def _val_setting(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The validation attack that scores ``best_val_pgd`` (saved with it in each checkpoint)."""
  return {"pgd_steps": int(cfg.eval.pgd_steps), "step_size": float(report.eval_step_size(cfg))}


def _forget_best(meta: dict[str, Any], why: str) -> None:
  """The best checkpoint ``why`` (is missing, cannot be read): the best-by-validation choice
  starts again from the next epoch. Updates ``meta``."""
  _log(f"WARNING: the best checkpoint (epoch {meta['best_epoch']}) {why}; the "
       f"best-by-validation choice starts again from epoch {meta['epoch'] + 1}.")
  meta.update(best_val_pgd=-1.0, best_epoch=-1)
  meta.pop("best_val_setting", None)


def _rescore_best(cfg, ckpt: checkpoint.Checkpointer, state, meta: dict[str, Any], val_eval,
                  ds: data.Dataset) -> None:
  """A resume with another validation attack than the one that scored the best checkpoint
  (or from a checkpoint that did not record it) scores the best checkpoint again with the new
  one, so that later epochs are ranked against it on the same scale. Updates ``meta``."""
  setting = _val_setting(cfg)
  if meta["best_epoch"] <= 0 or meta.get("best_val_setting") == setting:
    return
  try:
    best = ckpt.restore(jax.device_get(state), best=True)
  except CheckpointError as e:
    _forget_best(meta, f"could not be read ({e})")
    return
  if best is None:
    _forget_best(meta, "is gone")
    return
  b = best[0]
  v = val_eval({"params": b.params, "batch_stats": b.batch_stats}, ds.val_images,
               ds.val_labels, seed=cfg.seed)
  name = lambda a: f"PGD-{a['pgd_steps']}, step {a['step_size']:g}"  # noqa: E731
  before = meta.get("best_val_setting")
  _log(f"The best checkpoint (epoch {meta['best_epoch']}) "
       + (f"was scored by another validation attack ({name(before)})" if before else
          "does not record the validation attack that scored it")
       + f"; with this run's ({name(setting)}) its validation PGD accuracy is "
       f"{v['pgd_acc']:.4f} (was {meta['best_val_pgd']:.4f}), and later epochs are ranked "
       f"against that.")
  meta.update(best_val_pgd=float(v["pgd_acc"]), best_val_setting=setting)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       allow_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Trains ``cfg`` in ``workdir`` (resuming if it holds a checkpoint) and returns the report
  that it also writes to ``workdir/report.json``.

  ``allow_changes``: fields besides ``rundir.RESUMABLE_FIELDS`` that a resume may change
  (e.g. ``("train.lr",)`` after a divergence); each change is recorded.

  Raises:
    SovrError subclasses for bad input (ConfigError, DataError, DatasetNotFoundError,
    WorkdirError, WorkdirLockedError, CheckpointError) and TrainingDivergedError.
  """
  t_start = time.time()
  fields = config_lib.leaves(config_lib.default_schema())
  for f in allow_changes:  # a field or a section ("eval." or "eval")
    if f.rstrip(".") not in fields and not any(k.startswith(f.rstrip(".") + ".") for k in fields):
      raise ConfigError(f"--allow_change: {config_lib.unknown_field_message(f.rstrip('.'))}")
  setup = _prepare(cfg)  # every check that needs no workdir comes first
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; pass a folder (it is "
                       f"created if missing).")
  os.makedirs(workdir, exist_ok=True)
  with rundir.locked(workdir, enabled=_is_main()):
    changes = []
    if _is_main():
      changes = rundir.start_or_resume(workdir, cfg.to_dict(),
                                       config_lib.default_schema().to_dict(),
                                       allow=allow_changes, log=_log,
                                       guard=lambda diff: resume_hazards(cfg, diff))
    sharding.sync_processes("config-checked")
    return _train(cfg, workdir, setup, changes, t_start)


def _refuse_orphans(workdir: str, ckpt: checkpoint.Checkpointer) -> None:
  """A workdir without a latest checkpoint must not hold a best checkpoint or a report of an
  earlier run: training from step 0 would report that run's best model as this one's, or
  replace its report."""
  best, report_path = ckpt.best_steps(), rundir.path(workdir, rundir.REPORT_FILE)
  if not best and not os.path.exists(report_path):
    return
  held = " and ".join(filter(None, [
      f"a best checkpoint (step {best[-1]}) in {rundir.BEST_DIR}/" if best else "",
      f"{rundir.REPORT_FILE}" if os.path.exists(report_path) else ""]))
  raise WorkdirError(
      f"{workdir} has no checkpoint in {rundir.CHECKPOINTS_DIR}/ but holds {held} of an "
      f"earlier run: its checkpoints were deleted or moved. Training it again from step 0 "
      f"would mix the two runs. Use a new --workdir, or move {workdir} away (or delete its "
      f"{rundir.BEST_DIR}/ and {rundir.REPORT_FILE}) to start over.")


def _train(cfg, workdir, setup: _Setup, changes, t_start) -> dict[str, Any]:
  """Trains and reports; the checkpointer's and the metric writer's threads are closed however
  it ends. (A TensorBoard writer left open started a thread at exit, which Python 3.12
  refuses: a run stopped by a signal printed "Exception ignored in atexit callback".)"""
  with contextlib.ExitStack() as cleanup:
    ckpt = cleanup.enter_context(checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep))
    return _train_loop(cfg, workdir, setup, changes, t_start, ckpt, cleanup)


def _train_loop(cfg, workdir, setup: _Setup, changes, t_start, ckpt: checkpoint.Checkpointer,
                cleanup: contextlib.ExitStack) -> dict[str, Any]:
  ds, mesh, model, t = setup.ds, setup.mesh, setup.model, cfg.train
  steps_per_epoch = setup.steps_per_epoch
  step_rng, eval_rng = setup.rngs
  # Replicated before the restore, so that Orbax reads the checkpoint straight into
  # the global arrays (on every process when there are several).
  state = sharding.replicate(setup.state, mesh)
  meta = {"epoch": 0, "best_val_pgd": -1.0, "best_epoch": -1}
  restored = ckpt.restore(state)
  if restored is not None:
    state, meta = restored
    meta = {k: meta[k] for k in ("epoch", "best_val_pgd", "best_epoch", "best_val_setting")
            if k in meta}
    _log(f"Resumed from {workdir} at step {int(state.step)} (epoch {meta['epoch']}).")
    if meta["epoch"] > t.epochs:
      raise WorkdirError(f"The run in {workdir} has trained {meta['epoch']} epochs, more than "
                         f"train.epochs={t.epochs}; pass at least --config.train.epochs="
                         f"{meta['epoch']}.")
    if meta["best_epoch"] > 0 and not ckpt.best_steps():
      _forget_best(meta, f"is not in {os.path.join(workdir, rundir.BEST_DIR)} (a crash while "
                         f"it was saved?)")
  else:
    _refuse_orphans(workdir, ckpt)
  if _is_main():
    rundir.truncate_metrics(workdir, int(state.step), log=_log)
  writer = cleanup.enter_context(contextlib.closing(metric_writers.MetricWriter(workdir)))

  state = sharding.replicate(state, mesh)  # a no-op unless the restore changed shardings
  step = train.make_train_step(
      cfg, steps_per_epoch=steps_per_epoch, schedule=setup.schedule,
      reweight_start_epoch=methods.reweight_start_epoch(cfg.method, cfg, t.epochs))
  k = t.steps_per_dispatch
  single_fn = train.jit_train_step(step, mesh)
  multi_fn = train.jit_train_step(train.make_multi_step(step, k), mesh, stacked=True)
  val_eval = evaluate.Evaluator(model, mesh=mesh, eps=cfg.attack.eps,
                                step_size=report.eval_step_size(cfg), norm=cfg.attack.norm,
                                pgd_steps=cfg.eval.pgd_steps, cw_steps=0,
                                batch_size=report.eval_batch_size(cfg, ds, mesh))
  if restored is not None and ds.num_val:
    _rescore_best(cfg, ckpt, state, meta, val_eval, ds)
  hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
  _log(f"{cfg.method} | {cfg.model.name} (width {cfg.model.width}, "
       f"{models.count_params(state.params):,} params) | {ds.name}: {ds.num_train} train / "
       f"{ds.num_val} val / {ds.num_test} test | {mesh.devices.size} {jax.devices()[0].platform} "
       f"device(s){hosts} | {steps_per_epoch} steps/epoch")

  pending = _Pending()
  train_time = 0.0
  bar = _progress(t.epochs * steps_per_epoch, int(state.step), f"{cfg.method}")

  def diverged(what: str) -> TrainingDivergedError:
    last = ckpt.latest_step()
    kept = ("No checkpoint had been saved yet." if last is None else
            f"Nothing after the last good checkpoint (step {last}, in "
            f"{workdir}/{rundir.CHECKPOINTS_DIR}) was saved.")
    return TrainingDivergedError(
        f"{what} {kept} Lower train.lr (or use precision=float32, or check the data), then "
        f"either rerun in a new --workdir or resume this one with --allow_change=train.lr.")

  def flush(epoch: int) -> None:
    """Fetches pending metrics of (1-based) ``epoch``, stops on NaN, logs their means."""
    values = pending.fetch()
    if not values:
      return
    for s, v in values:
      if not (math.isfinite(v["loss"]) and math.isfinite(v["grad_norm"])):
        raise diverged(f"Non-finite loss at step {s} (epoch {epoch}): loss={v['loss']}, "
                       f"grad_norm={v['grad_norm']}.")
    mean = {name: float(np.mean([v[name] for _, v in values])) for name in values[0][1]}
    writer.write({"step": values[-1][0] + 1, "epoch": epoch, **mean})
    if bar is not None:
      bar.set_postfix(loss=f"{mean['loss']:.3f}", adv=f"{mean['adv_acc']:.3f}",
                      lr=f"{mean['lr']:.3g}", refresh=False)

  try:
    for epoch in range(int(meta["epoch"]), t.epochs):
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
        signals.raise_if_stopped()  # a signal whose exception a finalizer swallowed
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
          meta.update(best_val_pgd=v["pgd_acc"], best_epoch=epoch + 1,
                      best_val_setting=_val_setting(cfg))
          is_best = True
      meta["epoch"] = epoch + 1
      writer.write(record)  # before the checkpoint: a resume drops lines past its step
      if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or last or is_best:
        try:
          ckpt.save(state, {**meta, "config": cfg.to_dict()}, best=is_best)
        except TrainingDivergedError as e:
          raise diverged(str(e)) from None
      if bar is not None:
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items()))
  except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through cli.guarded
    # From the disk: a signal during a save can land after the step's folder was committed
    # and before the manager counted it ("No checkpoint had been saved yet" with step 8 there).
    last = next(iter(rundir.checkpoint_steps(workdir, "latest")), None)
    kept = ("No checkpoint had been saved yet: the same command starts the run again." if last
            is None else f"The newest checkpoint is step {last} in {workdir}/"
            f"{rundir.CHECKPOINTS_DIR}; the same command resumes from it (the steps after it "
            f"are trained again).")
    raise Interrupted(f"{str(e) or signals.interrupted(signal.SIGINT)} Training stopped in epoch "
                      f"{int(meta['epoch']) + 1}. {kept}",
                      getattr(e, "exit_status", 130)) from None
  finally:
    if bar is not None:
      bar.close()

  _log("Evaluating the final and best models on the test split ...")
  rep = report.final_report(cfg, workdir, ds, model, mesh, state, ckpt, meta, eval_rng)
  rep["config_changes"] = changes
  rep["timings"] = {"train_s": train_time, "total_s": time.time() - t_start,
                    "steps_per_epoch": steps_per_epoch}
  if _is_main():
    jsonio.write_json_atomic(rundir.path(workdir, rundir.REPORT_FILE), rep)
  final = rep["test"]["final"]
  writer.write_hparams(cfg.to_dict(), {k: final[k] for k in ("clean_acc", "pgd_acc", "cw_acc")
                                       if k in final})
  return rep

