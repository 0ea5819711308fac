"""The JAX engine: ``sovr_jax.attacks.autoattack`` on a target's JAX model, as a result.

Each attack runs on the points still robust, jitted and sharded over the devices, at a batch
shrunk to the points left; the attacks may compute on a bfloat16 copy of the network
(``Target.attack_fn``) while every decision is made on the float32 model. Needs no torch.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from sovr_jax.evaluation import schema
from sovr_jax.evaluation.settings import Settings
from sovr_jax.evaluation.targets import Target


def run(target: Target, *, attacks: Sequence[str], seed: int, batch_size: int,
        settings: Settings, version: str, attack_dtype: str = "float32",
        runs_at_once: int = 1, log: Callable[[str], None] = print,
        partial_out: str | None = None) -> dict[str, Any]:
  """The standard (or a custom) AutoAttack on ``target`` with the JAX engine. With
  ``partial_out``, an incomplete result is written there after every attack (a run cut by a
  time limit keeps the attacks that finished). ``runs_at_once``: see
  ``autoattack.run_standard`` (recorded in the settings; it changes speed, not results)."""
  # pylint: disable=import-outside-toplevel
  from sovr_jax import sharding
  from sovr_jax.attacks import autoattack
  # pylint: enable=import-outside-toplevel
  if target.model_fn is None:
    raise ValueError("The JAX engine attacks the JAX model: give --workdir (a training run) "
                     "or --model, not an export.")
  mesh = sharding.make_mesh()
  bs = sharding.round_to_devices(min(batch_size, max(target.n, 1)), mesh)
  s = settings.for_classes(target.num_classes)
  t0 = time.time()
  common = dict(version=version, attacks=attacks, eps=target.eps, norm=target.norm, seed=seed,
                batch_size=bs, settings={**_settings_dict(s), "attack_dtype": attack_dtype,
                                         "runs_at_once": runs_at_once},
                model=target.info, dataset=target.dataset,
                points_sha256=target.points_sha256)

  def save_partial(st):
    if partial_out is None or len(st["attacks"]) == len(attacks):
      return
    entries = [schema.attack_entry(a, robust_acc=st["robust_acc_after"][a],
                                   attacked=st["attacked"][a],
                                   broken=int(np.sum(st["broken_by"] == a)),
                                   time_s=st["time_s"][a], compile_s=st["compile_s"][a])
               for a in st["attacks"]]
    schema.write(partial_out, schema.build(
        "jax", clean=st["clean"], robust=st["robust"], broken_by=list(st["broken_by"]),
        per_attack=entries, checks={}, complete=False, **common))

  res = autoattack.run_standard(
      target.model_fn, target.x, target.y, seed, eps=target.eps, norm=target.norm,
      batch_size=bs, attacks=tuple(attacks), n_iter=s.n_iter, n_queries=s.n_queries,
      n_target_classes=s.n_target_classes, apgd_restarts=s.n_restarts, mesh=mesh, log=log,
      attack_model_fn=target.attack_fn, after_attack=save_partial,
      runs_at_once=runs_at_once)
  summ = res["summary"]
  per_attack = [
      schema.attack_entry(a, robust_acc=summ["robust_acc_after"][a],
                          attacked=summ["attacked"][a],
                          broken=int(np.sum(res["broken_by"] == a)),
                          time_s=summ["time_s"][a], compile_s=summ["compile_s"][a],
                          batch_rows=summ["attack_batch_size"].get(a))
      for a in attacks]
  common["settings"]["early_stop"] = summ["settings"]["early_stop"]
  return schema.build(
      "jax", clean=res["clean"], robust=res["robust"], broken_by=list(res["broken_by"]),
      per_attack=per_attack, checks=summ["checks"],
      extra={"wall_time_s": time.time() - t0}, **common)


def _settings_dict(s: Settings) -> dict[str, Any]:
  return {"n_iter": s.n_iter, "n_queries": s.n_queries, "n_target_classes": s.n_target_classes,
          "n_restarts": s.n_restarts}
