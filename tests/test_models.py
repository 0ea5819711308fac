"""Tests for sovr_jax.models (small widths so the whole file runs in well under a minute on CPU)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sovr_jax import train
from sovr_jax.models import (
  MODELS,
  PreActResNet18,
  ResNet18,
  SmallCNN,
  WideResNet,
  WideResNet28_10,
  WideResNet34_10,
  count_params,
  get_model,
)

TINY_WIDTH = 0.125
NUM_CLASSES = 7
BN_MODELS = ("preact_resnet18", "resnet18", "wrn34_10", "wrn28_10")
# Tiny-width checks use WRN-34 only; WRN-28 is the same code with fewer blocks.
FORWARD_MODELS = ("preact_resnet18", "resnet18", "wrn34_10", "small_cnn")


def input_shape(name: str, batch: int = 2) -> tuple[int, ...]:
  return (batch, 28, 28, 1) if name == "small_cnn" else (batch, 32, 32, 3)


def images(name: str, seed: int = 0, batch: int = 2) -> jax.Array:
  return jax.random.uniform(jax.random.PRNGKey(seed), input_shape(name, batch), jnp.float32)


def fast_init(model, x, seed: int = 1):
  """Variables with the structure of ``model.init`` but filled from NumPy (LeCun-normal kernels,
  BN scale 1, small random biases, running mean 0 / var 1). On CPU this avoids compiling
  dozens of truncated-normal initialisers, which costs ~10 s per ResNet; ``model.init`` itself is
  traced by the param-count tests and run for real in ``test_real_init_matches_structure``."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def fill(path, leaf):
    keys = [getattr(k, "key", str(k)) for k in path]
    collection, leaf_name, shape = keys[0], keys[-1], leaf.shape
    if leaf_name == "kernel":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif collection == "batch_stats":
      value = np.zeros(shape) if leaf_name == "mean" else np.ones(shape)
    elif leaf_name == "scale":
      value = np.ones(shape)
    elif leaf_name == "bias":
      value = 0.1 * rng.normal(size=shape)
    else:
      raise AssertionError(f"unexpected variable {keys}")
    return jnp.asarray(value, dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def tiny(name: str):
  """(model, variables, x) for a tiny-width model; cached across tests."""
  model = get_model(name, num_classes=NUM_CLASSES, width=TINY_WIDTH)
  x = images(name)
  return model, fast_init(model, x), x


def test_real_init_matches_structure():
  model, variables, x = tiny("small_cnn")
  real = train.init_variables(jax.random.PRNGKey(1), model, x.shape[1:])  # model.init, compiled
  chex.assert_trees_all_equal_shapes_and_dtypes(real, variables)
  chex.assert_type(model.apply(real, x), jnp.float32)


@functools.lru_cache(maxsize=None)
def jitted_apply(model, train: bool = False):
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


# --------------------------------------------------------------------------------------------------
# Parameter counts (abstract init only, no real compute).


@pytest.mark.parametrize(
  "name, expected",
  [
    ("preact_resnet18", 11_172_170),
    ("resnet18", 11_173_962),
    ("wrn34_10", 46_160_474),
    ("wrn28_10", 36_479_194),
    ("small_cnn", 312_202),
  ],
)
def test_param_counts_full_width(name, expected):
  model = get_model(name, num_classes=10)
  x = jax.ShapeDtypeStruct(input_shape(name, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert count_params(variables["params"]) == expected
  # Parameters are float32 regardless of the compute dtype.
  bf16 = get_model(name, num_classes=10, dtype=jnp.bfloat16)
  bf16_vars = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x)
  for leaf in jax.tree_util.tree_leaves(bf16_vars):
    assert leaf.dtype == jnp.float32
  assert count_params(bf16_vars["params"]) == expected


def test_batch_stats_not_counted_and_present_for_bn_models():
  for name in MODELS:
    model = get_model(name, num_classes=10)
    x = jax.ShapeDtypeStruct(input_shape(name, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert ("batch_stats" in variables) == (name in BN_MODELS)


def test_count_params_simple_tree():
  tree = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((5,))}}
  assert count_params(tree) == 17
  assert count_params({}) == 0


# --------------------------------------------------------------------------------------------------
# Forward pass at tiny width.


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_shape_dtype_jit(name):
  model, variables, x = tiny(name)
  logits = jitted_apply(model)(variables, x)
  chex.assert_shape(logits, (2, NUM_CLASSES))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)


def test_accepts_any_float_input_dtype():
  model, variables, x = tiny("small_cnn")
  ref = model.apply(variables, x)
  for dtype in (jnp.float16, jnp.bfloat16):
    out = model.apply(variables, x.astype(dtype))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2 * float(jnp.abs(ref).max()) + 1e-3, rtol=0)


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_bfloat16_compute_close_to_float32(name):
  model, variables, x = tiny(name)
  ref = jitted_apply(model)(variables, x)
  bf16 = get_model(name, num_classes=NUM_CLASSES, width=TINY_WIDTH, dtype=jnp.bfloat16)
  out = jitted_apply(bf16)(variables, x)  # same float32 params
  chex.assert_shape(out, ref.shape)
  chex.assert_type(out, jnp.float32)
  scale = float(jnp.abs(ref).max())
  assert scale > 0
  np.testing.assert_allclose(out, ref, atol=0.1 * scale + 1e-3, rtol=0)
  assert not np.array_equal(out, ref)  # the compute dtype is really bfloat16


@pytest.mark.parametrize("name", ("preact_resnet18", "resnet18", "wrn34_10"))
def test_train_updates_batch_stats_eval_does_not(name):
  model, variables, x = tiny(name)
  logits, updates = jitted_apply(model, train=True)(variables, x)
  chex.assert_shape(logits, (2, NUM_CLASSES))
  chex.assert_type(logits, jnp.float32)
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert len(old) == len(new) > 0
  chex.assert_trees_all_equal_shapes(variables["batch_stats"], updates["batch_stats"])
  assert all(not np.allclose(a, b) for a, b in zip(old, new))

  # Eval mode: nothing is written even when the collection is mutable.
  _, eval_updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
  chex.assert_trees_all_equal(eval_updates["batch_stats"], variables["batch_stats"])


def test_small_cnn_train_flag_is_noop():
  model, variables, x = tiny("small_cnn")
  np.testing.assert_array_equal(model.apply(variables, x, train=True), model.apply(variables, x))


# --------------------------------------------------------------------------------------------------
# Normalisation inside the model.


def test_normalisation_per_channel_matches_prenormalised_input():
  mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
  model, variables, x = tiny("preact_resnet18")  # identity normalisation
  normed = get_model(
    "preact_resnet18", num_classes=NUM_CLASSES, width=TINY_WIDTH, mean=mean, std=std
  )
  out = jitted_apply(normed)(variables, x)
  pre = (x - jnp.asarray(mean)) / jnp.asarray(std)
  ref = jitted_apply(model)(variables, pre)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # ... and it really changes the output compared with no normalisation.
  assert not np.allclose(out, jitted_apply(model)(variables, x), atol=1e-4)


def test_normalisation_broadcast_single_value():
  model, variables, x = tiny("small_cnn")
  normed = get_model(
    "small_cnn", num_classes=NUM_CLASSES, width=TINY_WIDTH, mean=(0.5,), std=(0.25,)
  )
  np.testing.assert_allclose(
    normed.apply(variables, x), model.apply(variables, (x - 0.5) / 0.25), rtol=1e-5, atol=1e-5
  )


def test_normalisation_length_mismatch_raises():
  model = SmallCNN(mean=(0.1, 0.2), std=(1.0,))
  with pytest.raises(ValueError, match="mean"):
    jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    )


def test_rejects_integer_and_wrong_rank_input():
  model = SmallCNN()
  with pytest.raises(ValueError, match="floating"):
    jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.uint8)
    )
  with pytest.raises(AssertionError):
    jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((28, 28, 1), jnp.float32)
    )


# --------------------------------------------------------------------------------------------------
# Registry and constructors.


def test_get_model_unknown_name():
  with pytest.raises(ValueError, match="name") as err:
    get_model("resnet50", num_classes=10)
  for valid in MODELS:
    assert valid in str(err.value)
  assert "resnet50" in str(err.value)


def test_registry_classes_and_attributes():
  assert MODELS["preact_resnet18"] is PreActResNet18
  assert MODELS["resnet18"] is ResNet18
  assert MODELS["small_cnn"] is SmallCNN
  wrn34 = get_model(
    "wrn34_10", num_classes=100, width=0.5, dtype=jnp.bfloat16, mean=[0.5], std=[0.2]
  )
  assert isinstance(wrn34, WideResNet34_10) and isinstance(wrn34, WideResNet)
  assert (wrn34.depth, wrn34.widen_factor) == (34, 10)
  assert (wrn34.num_classes, wrn34.width, wrn34.dtype) == (100, 0.5, jnp.bfloat16)
  assert (wrn34.mean, wrn34.std) == ((0.5,), (0.2,))
  wrn28 = get_model("wrn28_10", num_classes=10)
  assert isinstance(wrn28, WideResNet28_10) and wrn28.depth == 28


def test_wide_resnet_invalid_depth():
  model = WideResNet(depth=30, widen_factor=1)
  with pytest.raises(ValueError, match="depth"):
    jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )


def test_generic_wide_resnet_count():
  # WRN-16-1 at 10 classes: small enough to count by hand against the PyTorch reference layout.
  model = WideResNet(depth=16, widen_factor=1)
  variables = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  assert count_params(variables["params"]) == 175_066


def _activation_ops(jaxpr) -> int:
  """Element-wise multiplies, adds and subtracts with activation-shaped (rank-4) outputs."""
  return sum(eqn.primitive.name in ("mul", "add", "sub") and eqn.outvars[0].aval.ndim == 4
             for eqn in jaxpr.eqns)


@pytest.mark.parametrize("name,folds", [("preact_resnet18", 8), ("wrn34_10", 15),
                                        ("resnet18", 20)])
def test_folding_batchnorm_gives_the_same_function_with_fewer_passes(name, folds):
  """fold_bn (eval mode): each BatchNorm that follows a convolution (bn2 after conv1 in the
  pre-activation blocks; all 20 in ResNet-18) as one convolution with a bias, on random
  BatchNorm statistics and affine parameters: the same logits (up to float32 rounding) and input
  gradients, at least two element-wise passes over the activations fewer per fold, and training
  mode untouched.

  The input gradients are compared in float64: a network of ReLUs has a gradient that jumps
  where a pre-activation crosses zero, so float32 rounding alone can move a few of them across
  and change a patch of the gradient by up to 4e-3 of its scale (seen for ResNet-18 on one
  CPU, not on another); in float64 the two forms agree to far below float32's resolution."""
  from sovr_jax import testing  # pylint: disable=import-outside-toplevel

  def build(dtype=jnp.float32):
    model = get_model(name, num_classes=NUM_CLASSES, width=TINY_WIDTH, mean=(0.5,), std=(0.25,),
                      dtype=dtype)
    x = images(name, batch=4)
    return model, x, testing.random_variables(model, x, seed=3)

  def logits_and_grad(dtype):
    model, x, variables = build(dtype)

    def f(v, x, fold):
      out = lambda x: model.apply(v, x, train=False, fold_bn=fold)  # noqa: E731
      return out(x), jax.grad(lambda x: out(x)[:, 0].sum())(x)
    return [jax.jit(f, static_argnums=2)(variables, x, fold) for fold in (False, True)]

  (ref, _), (out, _) = logits_and_grad(jnp.float32)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))
  with jax.enable_x64(True):
    (ref, ref_grad), (out, grad) = logits_and_grad(jnp.float64)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-7 * float(jnp.abs(ref).max()))
  np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-7 * float(jnp.abs(ref_grad).max()))
  model, x, variables = build()
  ops = [_activation_ops(jax.make_jaxpr(
      lambda v, x, f=fold: model.apply(v, x, train=False, fold_bn=f))(variables, x).jaxpr)
         for fold in (False, True)]
  assert ops[0] - ops[1] >= 2 * folds, ops
  train_ref = model.apply(variables, x, train=True, mutable=["batch_stats"])
  train_out = model.apply(variables, x, train=True, fold_bn=True, mutable=["batch_stats"])
  chex.assert_trees_all_equal(train_out, train_ref)
