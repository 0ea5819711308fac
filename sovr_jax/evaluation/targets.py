"""What an evaluation attacks: a model in JAX and/or PyTorch, and the points.

A :class:`Target` holds the first ``n`` test points (NHWC float32 in [0, 1], int labels), the
threat model, the JAX model function (every decision is made on it; ``attack_fn`` may be the
same weights in bfloat16 for the attacks) and a factory of its PyTorch twin (the reference
AutoAttack attacks that). Builders:

* ``from_run``: a training run's checkpoint (``rundir.restore_run``, no torch needed unless
  the reference runs: the twin is built from the same variables on demand);
* ``from_export``: a PyTorch export (``sovr_jax.export``), for the reference engine only;
* ``tiny_mlp``: a one-hidden-layer MLP written identically in JAX and PyTorch, on random
  images it labels itself (clean accuracy 100 %), for tests and quick side-by-side checks;
* ``random_network``: a freshly initialised ``sovr_jax.models`` network on CIFAR-shaped
  random images, for timings;
* ``worst_case``: the same target where no point can be broken (+1e4 on the logit of
  class 0, every label 0), so every attack runs in full: timings only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable

import numpy as np

#: Logit offset of ``worst_case`` (no attack within eps can overcome it).
WORST_CASE_OFFSET = 1e4
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


@dataclasses.dataclass
class Target:
  """The model(s) and points of one evaluation."""

  x: np.ndarray                      # [n, H, W, C] float32 in [0, 1]
  y: np.ndarray                      # [n] int64
  eps: float
  norm: str                          # "linf" | "l2"
  num_classes: int
  info: dict[str, Any]               # the result's "model" entry
  dataset: str | None = None
  model_fn: Callable | None = None   # JAX x -> logits (decisions); None: no JAX model
  attack_fn: Callable | None = None  # JAX network the attacks compute on (None: model_fn)
  make_torch: Callable[[str], Any] | None = None  # device -> torch.nn.Module in eval mode
  upper_bounds: Callable[..., dict[str, Any]] | None = None  # JAX PGD-20/CW-20 on the points

  @property
  def n(self) -> int:
    return int(len(self.y))

  @functools.cached_property
  def points_sha256(self) -> str:
    """SHA-256 of the points (shape, float32 pixels, labels): two results with the same one
    were computed on the same images in the same order (``schema.comparable``)."""
    h = hashlib.sha256(repr(tuple(self.x.shape)).encode())
    h.update(np.ascontiguousarray(self.x, np.float32).tobytes())
    h.update(np.ascontiguousarray(self.y, np.int64).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# A training run, or its export.
# --------------------------------------------------------------------------------------------


def _torch_twin(name: str, variables: dict[str, Any], *, num_classes: int, width: float,
                mean, std, image_shape) -> Callable[[str], Any]:
  def make(device: str):
    from sovr_jax import export, torch_models  # pylint: disable=import-outside-toplevel
    h, w, c = image_shape
    sd = export.to_state_dict(name, variables["params"], variables.get("batch_stats"),
                              mean=mean, std=std)
    model = torch_models.build_torch_model(name, num_classes=num_classes, width=width,
                                           mean=mean, std=std, input_shape=(c, h, w))
    return torch_models.load_weights(model, sd).to(device).eval()
  return make


def from_run(workdir: str, *, checkpoint: str = "best", n: int, eps: float | None = None,
             attack_dtype: str = "float32", log: Callable[[str], None] = print) -> Target:
  """The first ``n`` test points of a training run and its restored model."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from sovr_jax import evaluate, rundir, sharding
  # pylint: enable=import-outside-toplevel
  log(f"Restoring the {checkpoint} checkpoint of {workdir} and its test split ...")
  run = rundir.restore_run(workdir, checkpoint=checkpoint)
  cfg, ds = run.cfg, run.dataset
  n = min(n, ds.num_test)
  mesh = sharding.make_mesh()
  variables = sharding.replicate(jax.tree.map(jnp.asarray, run.variables), mesh)
  model_fn = evaluate.model_fn_eval(run.model, variables)
  attack_fn = (None if attack_dtype == "float32"
               else evaluate.model_fn_eval(run.model, variables, jnp.dtype(attack_dtype)))
  eps = float(cfg.attack.eps) if eps is None else eps

  def upper_bounds(images, labels, *, eps, seed, batch_size):
    return evaluate.upper_bounds(run.model, run.variables, images, labels, eps=eps,
                                 norm=cfg.attack.norm, seed=seed, batch_size=batch_size,
                                 step_size=(cfg.eval.step_size
                                            if abs(eps - cfg.attack.eps) < 1e-12 else 0.0))

  return Target(
      x=ds.test_images[:n].astype(np.float32) / 255.0, y=ds.test_labels[:n].astype(np.int64),
      eps=eps, norm=cfg.attack.norm, num_classes=ds.num_classes, dataset=ds.name,
      info={"architecture": cfg.model.name, "width": float(cfg.model.width),
            "num_classes": ds.num_classes, "method": cfg.method, "workdir": run.workdir,
            "checkpoint": checkpoint, "checkpoint_path": run.checkpoint_path,
            "step": run.step, "epoch": run.meta.get("epoch")},
      model_fn=model_fn, attack_fn=attack_fn,
      make_torch=_torch_twin(cfg.model.name, run.variables, num_classes=ds.num_classes,
                             width=cfg.model.width, mean=ds.mean, std=ds.std,
                             image_shape=ds.image_shape),
      upper_bounds=upper_bounds)


def from_export(path: str, *, n: int, eps: float | None = None) -> Target:
  """The first ``n`` test points of the export's data set and its PyTorch model (reference
  engine only: an export has no JAX model)."""
  from sovr_jax import config_lib, experiment, export  # pylint: disable=import-outside-toplevel
  json_path, info = export.read_export_info(path)
  cfg = config_lib.from_dict(info["config"])
  ds = experiment.load_data(cfg)
  h, w, c = ds.image_shape
  if list(info["input_shape"]) != [c, h, w] or info["num_classes"] != ds.num_classes:
    raise ValueError(f"The export {json_path} expects inputs {info['input_shape']} (CHW) and "
                     f"{info['num_classes']} classes, but {ds.name} has {[c, h, w]} and "
                     f"{ds.num_classes}; it belongs to another run.")
  n = min(n, ds.num_test)
  src = info["source"]
  return Target(
      x=ds.test_images[:n].astype(np.float32) / 255.0, y=ds.test_labels[:n].astype(np.int64),
      eps=float(cfg.attack.eps) if eps is None else eps, norm=cfg.attack.norm,
      num_classes=ds.num_classes, dataset=ds.name,
      info={"architecture": info["architecture"], "width": info["width"],
            "num_classes": info["num_classes"], "method": info.get("method"),
            "workdir": src.get("workdir"), "checkpoint": src.get("checkpoint"),
            "checkpoint_path": src.get("path"), "step": src.get("step"),
            "export": json_path, "weights_sha256": info.get("weights_sha256")},
      make_torch=lambda device: export.load_exported(json_path, map_location=device))


# --------------------------------------------------------------------------------------------
# Models for tests and timings.
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


def tiny_mlp_jax(params: dict[str, np.ndarray]) -> Callable:
  """x [N, H, W, C] -> logits: relu(flat(x) w1 + b1) w2 + b2 (flattened in NHWC order)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  p = jax.tree.map(jnp.asarray, params)

  def model_fn(x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]
  return model_fn


def tiny_mlp_torch(params: dict[str, np.ndarray]):
  """The PyTorch twin of ``tiny_mlp_jax``: takes NCHW, flattens in NHWC order."""
  import torch  # pylint: disable=import-outside-toplevel

  class TinyMLP(torch.nn.Module):

    def __init__(self):
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

  return TinyMLP().eval()


def tiny_mlp_data(n: int, seed: int, params: dict[str, np.ndarray], shape=(8, 8, 3)):
  """n random NHWC images in [0, 1] labelled by the model itself (clean accuracy 100 %)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed + 1)
  x = rng.uniform(0.0, 1.0, (n,) + tuple(shape)).astype(np.float32)
  y = np.asarray(jnp.argmax(tiny_mlp_jax(params)(jnp.asarray(x)), -1)).astype(np.int64)
  return x, y


def tiny_mlp(n: int, *, seed: int = 0, eps: float = 0.02, norm: str = "linf") -> Target:
  params = tiny_mlp_params(seed)
  x, y = tiny_mlp_data(n, seed, params)
  return Target(x=x, y=y, eps=eps, norm=norm, num_classes=10, dataset=None,
                info={"architecture": "tiny_mlp", "input_shape": list(x.shape[1:])},
                model_fn=tiny_mlp_jax(params),
                make_torch=lambda device: tiny_mlp_torch(params).to(device))


def random_network(name: str, n: int, *, seed: int = 0, attack_dtype: str = "float32"
                   ) -> Target:
  """A freshly initialised ``sovr_jax.models`` network with CIFAR-10 shapes on uniform random
  images labelled by itself: for timings (its accuracies mean nothing)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from sovr_jax import evaluate, models, sharding, train
  # pylint: enable=import-outside-toplevel
  (mean, std), shape = CIFAR10_STATS, (32, 32, 3)
  model = models.get_model(name, num_classes=10, mean=mean, std=std)
  variables = jax.device_get(train.init_variables(jax.random.PRNGKey(seed), model, shape))
  rep = sharding.replicate(jax.tree.map(jnp.asarray, variables), sharding.make_mesh())
  model_fn = evaluate.model_fn_eval(model, rep)
  x = np.random.default_rng(seed + 1).uniform(0, 1, (n,) + shape).astype(np.float32)
  y = np.concatenate([np.asarray(jnp.argmax(model_fn(jnp.asarray(x[i:i + 500])), -1))
                      for i in range(0, n, 500)]).astype(np.int64)
  return Target(
      x=x, y=y, eps=8 / 255, norm="linf", num_classes=10, dataset=None,
      info={"architecture": name, "width": 1.0, "num_classes": 10, "note": "random init"},
      model_fn=model_fn,
      attack_fn=(None if attack_dtype == "float32"
                 else evaluate.model_fn_eval(model, rep, jnp.dtype(attack_dtype))),
      make_torch=_torch_twin(name, variables, num_classes=10, width=1.0, mean=mean, std=std,
                             image_shape=shape))


def worst_case_jax(model_fn: Callable) -> Callable:
  """``model_fn`` with +WORST_CASE_OFFSET on the logit of class 0 (use with all labels 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def fn(x):
    z = model_fn(x)
    return z + WORST_CASE_OFFSET * jax.nn.one_hot(jnp.zeros(z.shape[0], jnp.int32),
                                                  z.shape[-1], dtype=z.dtype)
  return fn


def worst_case_torch(model):
  """The PyTorch model with +WORST_CASE_OFFSET on the logit of class 0."""
  import torch  # pylint: disable=import-outside-toplevel

  class WorstCase(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, x):
      z = self.model(x)
      return z + WORST_CASE_OFFSET * torch.nn.functional.one_hot(
          torch.zeros(z.shape[0], dtype=torch.long, device=z.device), z.shape[-1]).to(z.dtype)

  return WorstCase().eval()


def worst_case(target: Target) -> Target:
  """No point can be broken: every attack runs in full on every point (timings only)."""
  make = target.make_torch
  return dataclasses.replace(
      target, y=np.zeros_like(target.y),
      info={**target.info, "worst_case": True},
      model_fn=target.model_fn and worst_case_jax(target.model_fn),
      attack_fn=target.attack_fn and worst_case_jax(target.attack_fn),
      make_torch=make and (lambda device: worst_case_torch(make(device))),
      upper_bounds=None)
