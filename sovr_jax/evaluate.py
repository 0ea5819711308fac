"""Clean and white-box PGD / CW evaluation of a trained model.

PGD-20 (CE objective) and CW-20 (PGD on the margin loss) accuracies are UPPER
BOUNDS on robust accuracy: a stronger attack (AutoAttack) can only lower them.
Report AutoAttack as the robustness figure and PGD as a bound.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sovr_jax import attacks, augment, losses, sharding

Array = jax.Array
UPPER_BOUND_NOTE = ("PGD-20 and CW-20 accuracies are upper bounds on robust accuracy; the "
                    "robustness figure is AutoAttack's (python -m sovr_jax.autoattack_eval).")


def model_fn_eval(model: Any, variables: Any, dtype: Any = None) -> Callable[[Array], Array]:
  """x -> logits with BatchNorm running statistics (PyTorch ``model.eval()``); ``dtype``
  (e.g. ``jnp.bfloat16``) recasts the model's compute dtype, same weights."""
  if dtype is not None:
    model = model.clone(dtype=dtype)
  return lambda x: model.apply(variables, x, train=False)


def make_eval_step(model: Any, *, eps: float, step_size: float, norm: str,
                   pgd_steps: int, cw_steps: int) -> Callable:
  """(variables, uint8 images, labels, rng) -> per-example results.

  Returns a dict with boolean "clean", "pgd" and (if cw_steps > 0) "cw"
  correctness [N], and the logit margin of the PGD example "pgd_margin" [N].
  """

  def step(variables, images, labels, rng):
    x = augment.to_float(images)
    fn = model_fn_eval(model, variables)
    pgd_rng, cw_rng = jax.random.split(rng)
    clean_logits = fn(x)
    out = {"clean": jnp.argmax(clean_logits, -1) == labels}
    x_pgd = attacks.pgd(fn, x, labels, pgd_rng, eps=eps, step_size=step_size,
                        num_steps=pgd_steps, norm=norm, objective="ce").x_adv
    pgd_logits = fn(x_pgd)
    out["pgd"] = jnp.argmax(pgd_logits, -1) == labels
    out["pgd_margin"] = losses.logit_margin(pgd_logits, labels)
    if cw_steps:
      x_cw = attacks.pgd(fn, x, labels, cw_rng, eps=eps, step_size=step_size,
                         num_steps=cw_steps, norm=norm, objective="margin").x_adv
      out["cw"] = jnp.argmax(fn(x_cw), -1) == labels
    return out

  return step


class Evaluator:
  """Compiles the eval step once for a model and attack settings.

  ``Evaluator(...)(variables, images, labels, seed=0)`` returns accuracies on
  (images, labels): clean, PGD-``pgd_steps`` and CW-``cw_steps`` (upper bounds
  on robust accuracy). The last batch is padded and the padding ignored, so
  every example counts once. With ``desc``, a progress bar (process 0) counts the batches.
  """

  def __init__(self, model: Any, *, mesh: jax.sharding.Mesh, eps: float,
               step_size: float, norm: str = "linf", pgd_steps: int = 20,
               cw_steps: int = 20, batch_size: int = 500, desc: str | None = None):
    attacks.check_attack_args(eps=eps, step_size=step_size, num_steps=pgd_steps, norm=norm)
    sharding.check_batch_size(batch_size, mesh, "eval.batch_size")
    self.mesh, self.batch_size, self.desc = mesh, batch_size, desc
    step = make_eval_step(model, eps=eps, step_size=step_size, norm=norm,
                          pgd_steps=pgd_steps, cw_steps=cw_steps)
    rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    self._step = jax.jit(step, in_shardings=(rep, bat, bat, rep), out_shardings=rep)

  def __call__(self, variables: Any, images: np.ndarray, labels: np.ndarray, *,
               seed: int = 0) -> dict[str, Any]:
    """Returns {"n", "clean_acc", "pgd_acc", "cw_acc" (if cw_steps), "pgd_margins"}."""
    n = len(labels)
    if n == 0:
      raise ValueError("Evaluation needs at least one example.")
    variables = sharding.replicate(variables, self.mesh)
    results: dict[str, list[np.ndarray]] = {}
    base = jax.random.PRNGKey(seed)
    bs = self.batch_size
    starts = range(0, n, bs)
    if self.desc and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      starts = tqdm(starts, desc=self.desc, unit="batch", leave=False, mininterval=2.0)
    for b, start in enumerate(starts):
      idx = np.arange(start, start + bs) % n
      x, y = sharding.global_batch((images[idx], labels[idx]), self.mesh)
      out = jax.device_get(self._step(variables, x, y, jax.random.fold_in(base, b)))
      keep = min(bs, n - start)
      for k, v in out.items():
        results.setdefault(k, []).append(np.asarray(v)[:keep])
    res = {k: np.concatenate(v) for k, v in results.items()}
    out = {"n": n, "pgd_margins": res.pop("pgd_margin")}
    out.update({f"{k}_acc": float(v.mean()) for k, v in res.items()})
    return out


def upper_bounds(model: Any, variables: Any, x: np.ndarray, labels: np.ndarray, *,
                 eps: float, norm: str, seed: int, batch_size: int, step_size: float = 0.0,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """The JAX model's clean, PGD-20 and CW-20 accuracies on float images ``x`` in [0, 1]
  (UPPER BOUNDS on robust accuracy, for the same points as an AutoAttack run); the step is
  ``step_size`` or eps / 4."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  step = step_size or eps / 4
  bs = sharding.round_to_devices(min(batch_size, len(labels)), mesh)
  images = np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
  r = Evaluator(model, mesh=mesh, eps=eps, step_size=step, norm=norm, pgd_steps=20,
                cw_steps=20, batch_size=bs, desc="PGD-20 / CW-20")(
                    variables, images, np.asarray(labels, np.int32), seed=seed)
  return {"clean_acc": r["clean_acc"], "pgd20_acc": r["pgd_acc"], "cw20_acc": r["cw_acc"],
          "step_size": step, "n": r["n"], "note": UPPER_BOUND_NOTE}
