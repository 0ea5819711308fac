"""The final report of a training run: test-set clean / PGD-20 / CW-20 of the final and the
best-by-validation models, and the adversarial logit margins of training examples.

Written by ``experiment.train_and_evaluate`` once training ends (W/report.json,
W/margins.json, W/margins.png). PGD-20 and CW-20 accuracies are upper bounds on robust
accuracy (``evaluate.UPPER_BOUND_NOTE``); the robustness figure is AutoAttack's.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sovr_jax import checkpoint, data, evaluate, jsonio, losses, models, rundir, sharding
from sovr_jax.errors import CheckpointError

def eval_step_size(cfg: ml_collections.ConfigDict) -> float:
  """The evaluation PGD/CW step: eval.step_size, or eps / 4 when it is 0."""
  return cfg.eval.step_size or cfg.attack.eps / 4


def eval_batch_size(cfg: ml_collections.ConfigDict, ds: data.Dataset,
                    mesh: jax.sharding.Mesh) -> int:
  """eval.batch_size, capped at the largest split and rounded down to the device count."""
  bs = min(cfg.eval.batch_size, max(ds.num_val, ds.num_test, 1))
  return sharding.round_to_devices(bs, mesh)


def margin_sample(num_train: int, n: int, seed: int) -> np.ndarray:
  """Indices of the ``n`` training examples whose margins the report measures: a random
  sample, in random order (so consecutive batches mix the classes as training batches do).
  The training split is ordered by class (image folders, the embedded sets): its first n
  examples were all airplanes on CIFAR-10 until 2026-12-03."""
  return np.random.default_rng([seed, 0x6D617267]).permutation(num_train)[:n]


def margin_groups(margins: np.ndarray, batch_size: int, fraction: float) -> np.ndarray:
  """SOVR's selection replayed on evaluation margins: in consecutive batches of
  ``batch_size``, the ceil(fraction * n) smallest margins are "small-margin"."""
  mask = np.zeros(len(margins), bool)
  for start in range(0, len(margins), batch_size):
    m = margins[start:start + batch_size]
    k = losses.num_switched(len(m), fraction)
    mask[start + np.argsort(m, kind="stable")[:k]] = True
  return mask


def margin_histogram(margins: np.ndarray, small: np.ndarray) -> dict[str, list]:
  lo, hi = float(np.percentile(margins, 0.5)), float(np.percentile(margins, 99.5))
  bins = np.linspace(min(lo, -1.0), max(hi, 1.0), 61)
  return {"bins": bins.tolist(),
          "small_margin": np.histogram(margins[small], bins)[0].tolist(),
          "other": np.histogram(margins[~small], bins)[0].tolist()}


def plot_margins(path: str, margins: np.ndarray, small: np.ndarray, title: str) -> None:
  """Histogram of adversarial logit margins, small-margin vs other examples."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  bins = margin_histogram(margins, small)["bins"]
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


def _test_results(evaluator, state, ckpt, meta, ds, seed) -> dict[str, Any]:
  """{"final": ..., "best": ...} on the test split (best = final when it is the best)."""
  final = evaluator({"params": state.params, "batch_stats": state.batch_stats},
                    ds.test_images, ds.test_labels, seed=seed)
  final.pop("pgd_margins")
  results = {"final": {"epoch": meta["epoch"], **final}}
  if meta["best_epoch"] == meta["epoch"]:
    results["best"] = {"epoch": meta["best_epoch"], "val_pgd_acc": meta["best_val_pgd"],
                       **final}
    return results
  try:
    best = ckpt.restore(jax.device_get(state), best=True)
  except CheckpointError as e:
    if jax.process_index() == 0:
      print(f"WARNING: the best checkpoint could not be read ({e}); reporting the final "
            f"model only.", flush=True)
    return results
  if best is not None:
    best_state, best_meta = best
    r = evaluator({"params": best_state.params, "batch_stats": best_state.batch_stats},
                  ds.test_images, ds.test_labels, seed=seed)
    r.pop("pgd_margins")
    # The live meta's score: a resume with another validation attack scored the best again.
    score = meta["best_val_pgd"] if meta["best_epoch"] == best_meta["best_epoch"] else best_meta[
        "best_val_pgd"]
    results["best"] = {"epoch": best_meta["best_epoch"], "val_pgd_acc": score, **r}
  return results


def final_report(cfg: ml_collections.ConfigDict, workdir: str, ds: data.Dataset, model: Any,
                 mesh: jax.sharding.Mesh, state: Any, ckpt: checkpoint.Checkpointer,
                 meta: dict[str, Any], eval_rng: jax.Array) -> dict[str, Any]:
  """Evaluates the final and best models on the test split and the margins on training
  examples; writes margins.json and margins.png (process 0) and returns the report."""
  t0 = time.time()
  eval_bs = eval_batch_size(cfg, ds, mesh)
  test = evaluate.Evaluator(model, mesh=mesh, eps=cfg.attack.eps, step_size=eval_step_size(cfg),
                            norm=cfg.attack.norm, pgd_steps=cfg.eval.pgd_steps,
                            cw_steps=cfg.eval.cw_steps, batch_size=eval_bs,
                            desc="test")
  seed = int(jax.random.randint(eval_rng, (), 0, 2**30))
  results = _test_results(test, state, ckpt, meta, ds, seed)
  # Margin histogram on training examples under the training attack.
  n = min(cfg.eval.margin_examples, ds.num_train)
  idx = margin_sample(ds.num_train, n, cfg.seed)
  margin_eval = evaluate.Evaluator(
      model, mesh=mesh, eps=cfg.attack.eps, step_size=cfg.attack.step_size,
      norm=cfg.attack.norm, pgd_steps=cfg.attack.num_steps, cw_steps=0,
      batch_size=sharding.round_to_devices(min(eval_bs, cfg.train.batch_size), mesh),
      desc="margins")
  margins = margin_eval({"params": state.params, "batch_stats": state.batch_stats},
                        ds.train_images[idx], ds.train_labels[idx], seed=seed)["pgd_margins"]
  small = margin_groups(margins, cfg.train.batch_size, cfg.sovr.ovr_fraction)
  if jax.process_index() == 0:
    jsonio.write_json_atomic(os.path.join(workdir, rundir.MARGINS_JSON),
                             {"margins": np.round(margins, 4).tolist(),
                              "small_margin": small.tolist(), "n": n,
                              "examples": "a random sample of the training split "
                                          "(report.margin_sample)",
                              "classes": np.bincount(ds.train_labels[idx],
                                                     minlength=ds.num_classes).tolist(),
                              "attack": f"PGD-{cfg.attack.num_steps}"})
    plot_margins(os.path.join(workdir, rundir.MARGINS_PNG), margins, small,
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
      "note": evaluate.UPPER_BOUND_NOTE,
      "margins": {"n": n, "sample": "random", "mean": float(margins.mean()),
                  "mean_small_margin": float(margins[small].mean()),
                  "mean_other": float(margins[~small].mean()) if (~small).any() else None,
                  "histogram": margin_histogram(margins, small)},
      "config": cfg.to_dict(),
      **rundir.provenance(),
      "eval_s": time.time() - t0,
  }
