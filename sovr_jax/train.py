"""The train step (attack -> method loss -> gradient -> optax update) and its state.

``make_train_step`` returns one pure function ``(state, batch, rng) -> (state,
metrics)``; ``jit_train_step`` compiles it over a data-parallel mesh with the
state replicated and donated and the batch sharded along "data". The rng is
folded with the step number inside, so the same (seed, step) gives the same
augmentation and attack start wherever and whenever the step runs.

BatchNorm: the attack sees running statistics without updating them
(``attack.bn_mode="eval"``, PyTorch ``model.eval()``) or batch statistics
without updating them (``"batch"``); the running statistics are updated only
by the training forward pass(es) of the loss.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from sovr_jax import attacks, augment, losses, methods, sharding
from sovr_jax.errors import ConfigError

Array = jax.Array


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate at (absolute) optimizer step t, with S = steps_per_epoch, W = the warm-up
  steps ``warmup_epochs * S`` and T = ``epochs * S``:

    warm-up (t < W):  lr * t / W
    piecewise:        lr * lr_decay ** #{b in lr_boundaries : t >= b * S}
    cosine:           lr * (1 + cos(pi * (t - W) / (T - W))) / 2, reaching 0 at t = T
    constant:         lr

  Boundaries are absolute epochs whatever the warm-up: with 1 warm-up epoch and boundaries
  (6, 7), the lr drops at the start of epochs 7 and 8 (1-based), as without a warm-up.
  (``optax.join_schedules`` would call the second schedule with ``t - W`` and move every
  boundary later by the warm-up, so it is not used for piecewise.)
  """
  t = cfg.train
  total = t.epochs * steps_per_epoch
  warmup = int(t.warmup_epochs * steps_per_epoch)
  if t.schedule == "piecewise":
    steps = [int(b * steps_per_epoch) for b in t.lr_boundaries]
    if len(set(steps)) < len(steps):  # a dict keyed by step would keep one of the decays
      raise ConfigError(f"Config field 'train.lr_boundaries': {tuple(t.lr_boundaries)} fall on "
                        f"the same step at {steps_per_epoch} steps per epoch ({steps}), so "
                        f"one decay would be lost; move them at least one step apart.")
    main = optax.piecewise_constant_schedule(t.lr, {s: t.lr_decay for s in steps})
  elif t.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(t.lr, max(1, total - warmup))
    main = lambda step: cosine(jnp.maximum(step - warmup, 0))  # noqa: E731
  elif t.schedule == "constant":
    main = optax.constant_schedule(t.lr)
  else:
    raise ValueError(f"train.schedule must be piecewise, cosine or constant, got {t.schedule!r}.")
  if not warmup:
    return main

  def schedule(step):
    ramp = t.lr * jnp.asarray(step, jnp.float32) / warmup
    return jnp.where(step < warmup, ramp, main(step))
  return schedule


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule):
  """PyTorch-style SGD: v = mu * v + (g + wd * p); p -= lr * v (wd on every parameter,
  as in the reference training scripts)."""
  t = cfg.train
  return optax.chain(optax.add_decayed_weights(t.weight_decay),
                     optax.sgd(schedule, momentum=t.momentum or None, nesterov=t.nesterov))


def global_norm(tree: Any) -> Array:
  """sqrt(sum of x^2 over every leaf): the gradient's L2 norm, the ``grad_norm`` metric.

  Written out because optax renamed it within the versions we support: ``optax.global_norm``
  is deprecated (a DeprecationWarning on 0.2.8) for ``optax.tree.norm``, which 0.2.4 lacks.
  """
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def _init_fn(model: Any, image_shape: tuple[int, ...]) -> Callable[[Array], dict[str, Any]]:
  return lambda rng: model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                                train=False)


# Both initialisations below are compiled as one program, not run op by op: bitwise the same
# values, and on a 2-core CPU PreActResNet-18 at width 1/16 initialised in 20 s instead of 28 s
# cold, 1.2 s instead of 2.4 s from the compilation cache (2026-12-03).
#
# On the CPU that program is compiled at XLA's LLVM level 2 instead of the default 3. At level 3
# LLVM spends seconds on the random-number fusions of the initialisers (threefry on every
# parameter's shape): jax 0.10.2 on this 2-core CPU compiled the initialisation of SmallCNN at
# width 1/4 in 7.5 s at level 3 and 1.3 s at level 2, PreActResNet-18 at width 1/16 in 15.3 s
# and 2.7 s, WRN-34-10 at 1/16 in 13.6 s and 4.2 s, with bitwise the same variables
# (2026-12-03). The program runs once, so only its compile time matters; level 0 compiled it
# faster still but changed the weights by a few rounding steps. Other backends keep XLA's
# defaults.
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def _compile_and_run(fn: Callable[[Array], Any], rng: Array) -> Any:
  """``jax.jit(fn)(rng)``, compiled with ``_CPU_INIT_COMPILER_OPTIONS`` on the CPU; traced
  as it is under a transformation (``jax.eval_shape``), where nothing is compiled."""
  if isinstance(rng, jax.core.Tracer):
    return jax.jit(fn)(rng)
  options = _CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(rng).compile(compiler_options=options)(rng)


def init_variables(rng: Array, model: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """``model.init`` (eval mode) on one zero image of ``image_shape``."""
  return _compile_and_run(_init_fn(model, image_shape), rng)


def create_train_state(rng: Array, model: Any, image_shape: tuple[int, ...], tx) -> TrainState:
  """The initial variables (``init_variables``'s) and the optimizer's state."""
  init = _init_fn(model, image_shape)

  def create(rng):
    variables = init(rng)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx)

  return _compile_and_run(create, rng)


def attack_init(cfg: ml_collections.ConfigDict) -> str:
  spec = methods.get_spec(cfg.method)
  return spec.default_init if cfg.attack.init == "auto" else cfg.attack.init


def make_train_step(cfg: ml_collections.ConfigDict, *, steps_per_epoch: int,
                    schedule: optax.Schedule, reweight_start_epoch: int = 0
                    ) -> Callable[[TrainState, tuple[Array, Array], Array],
                                  tuple[TrainState, dict[str, Array]]]:
  """The pure train step for ``cfg.method``.

  batch: (uint8 images [N, H, W, C], int32 labels [N]); augmentation (pad-crop,
  flip) runs inside, on device.

  Metrics (batch means): loss, adv_acc (accuracy on the training attack's
  output, clean for "standard"), clean_acc (running-statistics forward; left out with
  ``train.clean_acc_metric=False``, and then that forward is compiled away unless the method
  needs clean logits: TRADES's attack, SOVR's clean margins), margin (mean adversarial logit
  margin), switched (fraction trained with OVR), weight (mean MAIL/GAIRAT weight), lr,
  grad_norm.
  """
  spec = methods.get_spec(cfg.method)
  a = cfg.attack
  init = attack_init(cfg)
  attacks.check_attack_args(eps=a.eps, step_size=a.step_size, num_steps=a.num_steps,
                            norm=a.norm, init=init, objective=spec.attack_objective or "ce")
  crop_pad, flip = int(cfg.data.crop_pad), bool(cfg.data.flip)
  needs_clean_margin = cfg.method == "sovr" and cfg.sovr.margin_on == "clean"
  fold = {"fold_bn": True} if a.fold_bn else {}

  def train_step(state: TrainState, batch, rng):
    images, labels = batch
    rng = jax.random.fold_in(rng, state.step)
    aug_rng, attack_rng = jax.random.split(rng)
    x = augment.to_float(images)
    if crop_pad or flip:
      x = augment.random_crop_flip(aug_rng, x, pad=crop_pad, flip=flip)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def eval_fn(v):  # running statistics (folded into the convolutions with attack.fold_bn)
      return state.apply_fn(variables, v, train=False, **fold)

    def batch_stats_fn(v):
      return state.apply_fn(variables, v, train=True, mutable=["batch_stats"])[0]

    attack_fn = eval_fn if a.bn_mode == "eval" else batch_stats_fn
    clean_eval_logits = jax.lax.stop_gradient(eval_fn(x))
    kappa = None
    if spec.attack_objective is None:
      x_adv = x
    else:
      clean_attack_logits = (clean_eval_logits if a.bn_mode == "eval"
                             else jax.lax.stop_gradient(attack_fn(x)))
      res = attacks.pgd(attack_fn, x, labels, attack_rng, eps=a.eps, step_size=a.step_size,
                        num_steps=a.num_steps, norm=a.norm, objective=spec.attack_objective,
                        init=init, clean_logits=clean_attack_logits,
                        return_kappa=spec.needs_kappa)
      x_adv, kappa = res.x_adv, res.kappa
    epoch = state.step // steps_per_epoch
    reweight = epoch >= reweight_start_epoch

    def loss_fn(params):
      stats = state.batch_stats
      clean_logits = None
      if spec.clean_forward:
        clean_logits, upd = state.apply_fn({"params": params, "batch_stats": stats}, x,
                                           train=True, mutable=["batch_stats"])
        stats = upd.get("batch_stats", stats)
      adv_logits, upd = state.apply_fn({"params": params, "batch_stats": stats}, x_adv,
                                       train=True, mutable=["batch_stats"])
      stats = upd.get("batch_stats", stats)
      if needs_clean_margin:
        clean_logits = clean_eval_logits
      per_example, aux = methods.method_loss(
          cfg.method, cfg, adv_logits=adv_logits, labels=labels, clean_logits=clean_logits,
          kappa=kappa, reweight=reweight, num_attack_steps=a.num_steps)
      return jnp.mean(per_example), (stats, adv_logits, aux)

    (loss, (new_stats, adv_logits, aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    metrics = {
        "loss": loss,
        "adv_acc": jnp.mean(jnp.argmax(adv_logits, -1) == labels),
        "margin": jnp.mean(losses.logit_margin(adv_logits, labels)),
        "switched": jnp.mean(aux["switched"]),
        "weight": jnp.mean(aux["weight"]),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "grad_norm": global_norm(grads),
    }
    if cfg.train.clean_acc_metric:
      metrics["clean_acc"] = jnp.mean(jnp.argmax(clean_eval_logits, -1) == labels)
    return new_state, metrics

  return train_step


def make_multi_step(step_fn: Callable, num_steps: int) -> Callable:
  """``num_steps`` train steps in one dispatch (``lax.scan`` over stacked
  batches [num_steps, N, ...]); metrics come back stacked [num_steps]. The
  rng is folded with each step's number, so the result equals num_steps
  single steps."""
  if num_steps < 1:
    raise ValueError(f"steps_per_dispatch must be >= 1, got {num_steps}.")

  def multi_step(state, batches, rng):
    return jax.lax.scan(lambda s, b: step_fn(s, b, rng), state, batches)
  return multi_step


def jit_train_step(step_fn: Callable, mesh: jax.sharding.Mesh, *,
                   stacked: bool = False) -> Callable:
  """jax.jit over ``mesh``: state replicated and donated, batch sharded on "data"
  (along axis 1 for the stacked batches of ``make_multi_step``)."""
  rep, bat = sharding.replicated(mesh), sharding.batch_sharded(mesh, int(stacked))
  return jax.jit(step_fn, in_shardings=(rep, (bat, bat), rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def put_batch(batch: tuple[Any, Any], mesh: jax.sharding.Mesh, *, stacked: bool = False):
  """Host (images, labels) -> global arrays sharded like ``jit_train_step`` expects."""
  return sharding.global_batch(batch, mesh, batch_axis=int(stacked))
