"""PyTorch twins of the Flax model zoo (``sovr_jax.models``), for export and AutoAttack.

Every architecture of ``sovr_jax.models`` has a twin here with the same layers, the same
``width`` multiplier and channel rounding, and module names that follow the Flax layer names, so
that the Flax parameter ``layer1_0/bn1/scale`` is the PyTorch parameter ``layer1_0.bn1.weight``
(``sovr_jax.export.to_state_dict`` does the conversion). Conventions:

* inputs are NCHW float images in [0, 1]; ``(x - mean) / std`` happens inside the model, with
  ``mean`` and ``std`` registered as buffers of shape [1, C or 1, 1, 1];
* BatchNorm uses eps 1e-5 and, in ``eval()`` mode, the running statistics (the exported Flax
  ``batch_stats``); the Flax model's ``train=False`` forward is the twin's ``eval()`` forward;
* convolutions use PyTorch's symmetric integer padding, which the Flax models also use
  explicitly (see ``sovr_jax/models/common.py``); global pooling is a spatial mean.

Sources: PreActResNet-18 after github.com/locuslab/robust_overfitting ``preactresnet.py``
(Rice et al., 2020; final BN-ReLU before pooling); ResNet-18 after github.com/kuangliu/pytorch-cifar
``models/resnet.py`` (its ``shortcut`` Sequential is split into ``shortcut_conv`` and
``shortcut_bn``); WideResNet after github.com/yaodongyu/TRADES ``models/wideresnet.py`` /
xternalz/WideResNet-pytorch (without TRADES's unused ``sub_block1`` and without dropout); SmallCNN
after TRADES ``models/small_cnn.py`` (without dropout).

This module imports torch only (never JAX), so an exported model can be loaded and attacked in
an environment without JAX.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sovr_jax.errors import ConfigError

#: Architectures with a PyTorch twin (the names of ``sovr_jax.models.MODELS``).
ARCHITECTURES = ("preact_resnet18", "resnet18", "wrn34_10", "wrn28_10", "small_cnn")

#: Default input shape (C, H, W) per architecture when none is given.
DEFAULT_INPUT_SHAPES = {
    "preact_resnet18": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "wrn34_10": (3, 32, 32),
    "wrn28_10": (3, 32, 32),
    "small_cnn": (1, 28, 28),
}

BN_EPS = 1e-5
#: Names of the normalisation buffers (present in a full state dict, optional in ``load_weights``).
NORMALIZATION_BUFFERS = ("mean", "std")


def scaled(base: int, width: float) -> int:
  """Channel count ``base`` scaled by the width multiplier: ``max(1, int(round(base * width)))``.

  The same rule as ``sovr_jax.models.common.scaled`` (replicated here because that module imports
  JAX); a test checks that the two agree.
  """
  return max(1, int(round(base * width)))


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int,
          bias: bool = False) -> nn.Conv2d:
  return nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=padding, bias=bias)


def _bn(ch: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=0.1)


def _stats(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
  values = tuple(float(v) for v in values)
  if len(values) not in (1, channels):
    raise ValueError(f"{what} has {len(values)} entries; expected 1 (broadcast) or {channels} "
                     f"(one per input channel).")
  if what == "std" and any(v <= 0 for v in values):
    raise ValueError(f"std must be positive, got {values}.")
  return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class _Normalized(nn.Module):
  """Base class: holds the ``mean``/``std`` buffers and checks the input batch."""

  def __init__(self, mean: Sequence[float], std: Sequence[float], in_channels: int):
    super().__init__()
    self.in_channels = int(in_channels)
    self.register_buffer("mean", _stats(mean, self.in_channels, "mean"))
    self.register_buffer("std", _stats(std, self.in_channels, "std"))

  def normalize(self, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != self.in_channels:
      raise ValueError(f"{type(self).__name__} expects an NCHW batch with {self.in_channels} "
                       f"channels, got shape {tuple(x.shape)} (NHWC arrays must be transposed "
                       f"with x.permute(0, 3, 1, 2)).")
    if not torch.is_floating_point(x):
      raise ValueError(f"model input must be a floating-point image in [0, 1]; got dtype "
                       f"{x.dtype} (divide uint8 images by 255).")
    # NCHW-contiguous from here on: a channels-last strided input (e.g. an NHWC array
    # permuted) sends torch 2.13's oneDNN convolution backward into a heap corruption on some
    # CPUs ("double free or corruption", seen with AVX2), so it is never passed on.
    return ((x.to(self.mean.dtype) - self.mean) / self.std).contiguous()


class PreActBlock(nn.Module):
  """Pre-activation basic block: out = relu(bn1(x)); shortcut = conv1x1(out) if the shape
  changes else x; out = conv2(relu(bn2(conv1(out)))) + shortcut."""

  def __init__(self, in_ch: int, features: int, stride: int = 1):
    super().__init__()
    self.bn1 = _bn(in_ch)
    self.conv1 = _conv(in_ch, features, 3, stride, 1)
    self.bn2 = _bn(features)
    self.conv2 = _conv(features, features, 3, 1, 1)
    if stride != 1 or in_ch != features:
      self.shortcut = _conv(in_ch, features, 1, stride, 0)
    else:
      self.shortcut = None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if self.shortcut is not None else x
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class PreActResNet18(_Normalized):
  """PreActResNet-18 (robust_overfitting variant): conv1 -> 4 x 2 PreActBlocks -> BN -> ReLU ->
  global mean pool -> linear."""

  def __init__(self, num_classes: int = 10, width: float = 1.0, mean: Sequence[float] = (0.0,),
               std: Sequence[float] = (1.0,), in_channels: int = 3):
    super().__init__(mean, std, in_channels)
    ch = scaled(64, width)
    self.conv1 = _conv(in_channels, ch, 3, 1, 1)
    for stage, (base, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for i in range(2):
        features = scaled(base, width)
        self.add_module(f"layer{stage}_{i}", PreActBlock(ch, features, stride if i == 0 else 1))
        ch = features
    self.bn = _bn(ch)
    self.linear = nn.Linear(ch, num_classes)
    self._blocks = [f"layer{s}_{i}" for s in range(1, 5) for i in range(2)]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv1(self.normalize(x))
    for name in self._blocks:
      out = getattr(self, name)(out)
    out = F.relu(self.bn(out)).mean(dim=(2, 3))
    return self.linear(out)


class BasicBlock(nn.Module):
  """Post-activation basic block (kuangliu): out = relu(bn2(conv2(relu(bn1(conv1(x))))) +
  shortcut(x)), shortcut = shortcut_bn(shortcut_conv(x)) when the shape changes."""

  def __init__(self, in_ch: int, features: int, stride: int = 1):
    super().__init__()
    self.conv1 = _conv(in_ch, features, 3, stride, 1)
    self.bn1 = _bn(features)
    self.conv2 = _conv(features, features, 3, 1, 1)
    self.bn2 = _bn(features)
    if stride != 1 or in_ch != features:
      self.shortcut_conv = _conv(in_ch, features, 1, stride, 0)
      self.shortcut_bn = _bn(features)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.shortcut_conv is not None:
      shortcut = self.shortcut_bn(self.shortcut_conv(x))
    else:
      shortcut = x
    return F.relu(out + shortcut)


class ResNet18(_Normalized):
  """CIFAR ResNet-18 (kuangliu): conv1 -> BN -> ReLU -> 4 x 2 BasicBlocks -> global mean pool ->
  linear."""

  def __init__(self, num_classes: int = 10, width: float = 1.0, mean: Sequence[float] = (0.0,),
               std: Sequence[float] = (1.0,), in_channels: int = 3):
    super().__init__(mean, std, in_channels)
    ch = scaled(64, width)
    self.conv1 = _conv(in_channels, ch, 3, 1, 1)
    self.bn1 = _bn(ch)
    for stage, (base, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for i in range(2):
        features = scaled(base, width)
        self.add_module(f"layer{stage}_{i}", BasicBlock(ch, features, stride if i == 0 else 1))
        ch = features
    self.linear = nn.Linear(ch, num_classes)
    self._blocks = [f"layer{s}_{i}" for s in range(1, 5) for i in range(2)]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(self.normalize(x))))
    for name in self._blocks:
      out = getattr(self, name)(out)
    return self.linear(out.mean(dim=(2, 3)))


class WideBasicBlock(nn.Module):
  """TRADES / xternalz WRN block. If in == out: out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + x;
  otherwise a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + convShortcut(a)."""

  def __init__(self, in_ch: int, features: int, stride: int = 1):
    super().__init__()
    self.equal_in_out = in_ch == features
    self.bn1 = _bn(in_ch)
    self.conv1 = _conv(in_ch, features, 3, stride, 1)
    self.bn2 = _bn(features)
    self.conv2 = _conv(features, features, 3, 1, 1)
    # pylint: disable-next=invalid-name
    self.convShortcut = None if self.equal_in_out else _conv(in_ch, features, 1, stride, 0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    act = F.relu(self.bn1(x))
    out = self.conv1(act)
    out = self.conv2(F.relu(self.bn2(out)))
    shortcut = x if self.equal_in_out else self.convShortcut(act)
    return out + shortcut


class WideResNet(_Normalized):
  """WideResNet-``depth``-``widen_factor`` (TRADES / xternalz, no dropout): conv1 -> 3 groups of
  (depth - 4) / 6 blocks (16k, 32k, 64k channels) -> BN -> ReLU -> global mean pool -> fc."""

  def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
               width: float = 1.0, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
               in_channels: int = 3):
    super().__init__(mean, std, in_channels)
    if depth < 10 or (depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1; got depth={depth}")
    n = (depth - 4) // 6
    k = int(widen_factor)
    self.depth, self.widen_factor = int(depth), k
    ch = scaled(16, width)
    self.conv1 = _conv(in_channels, ch, 3, 1, 1)
    self._blocks = []
    for group, (base, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
      for i in range(n):
        features = scaled(base, width)
        name = f"block{group}_{i}"
        self.add_module(name, WideBasicBlock(ch, features, stride if i == 0 else 1))
        self._blocks.append(name)
        ch = features
    self.bn1 = _bn(ch)
    self.fc = nn.Linear(ch, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv1(self.normalize(x))
    for name in self._blocks:
      out = getattr(self, name)(out)
    out = F.relu(self.bn1(out)).mean(dim=(2, 3))
    return self.fc(out)


class SmallCNN(_Normalized):
  """TRADES SmallCNN without dropout: conv3x3/32-ReLU x2, maxpool 2, conv3x3/64-ReLU x2,
  maxpool 2, flatten (NCHW order, as the Flax model), fc1 200-ReLU, fc2 200-ReLU, fc3."""

  def __init__(self, num_classes: int = 10, width: float = 1.0, mean: Sequence[float] = (0.0,),
               std: Sequence[float] = (1.0,), in_channels: int = 1,
               image_size: tuple[int, int] = (28, 28)):
    super().__init__(mean, std, in_channels)
    c1, c2, hidden = scaled(32, width), scaled(64, width), scaled(200, width)
    # 3x3 valid conv (-2) twice, 2x2 max-pool (floor), again: s -> ((s - 4) // 2 - 4) // 2.
    h, w = (((int(s) - 4) // 2 - 4) // 2 for s in image_size)
    if h < 1 or w < 1:
      raise ValueError(f"SmallCNN needs images of at least 16x16 pixels, got {tuple(image_size)}.")
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.conv1 = _conv(in_channels, c1, 3, 1, 0, bias=True)
    self.conv2 = _conv(c1, c1, 3, 1, 0, bias=True)
    self.conv3 = _conv(c1, c2, 3, 1, 0, bias=True)
    self.conv4 = _conv(c2, c2, 3, 1, 0, bias=True)
    self.fc1 = nn.Linear(c2 * h * w, hidden)
    self.fc2 = nn.Linear(hidden, hidden)
    self.fc3 = nn.Linear(hidden, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.conv1(self.normalize(x)))
    out = F.max_pool2d(F.relu(self.conv2(out)), 2, 2)
    out = F.relu(self.conv3(out))
    out = F.max_pool2d(F.relu(self.conv4(out)), 2, 2)
    out = torch.flatten(out, 1)
    out = F.relu(self.fc1(out))
    out = F.relu(self.fc2(out))
    return self.fc3(out)


def check_architecture(name: str) -> None:
  """Raises ValueError if ``name`` has no PyTorch twin, listing the known architectures."""
  if name not in ARCHITECTURES:
    raise ConfigError(f"Unknown architecture {name!r}; known architectures: "
                     f"{', '.join(ARCHITECTURES)}.")


def build_torch_model(name: str, *, num_classes: int, width: float = 1.0,
                      mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                      input_shape: Sequence[int] | None = None) -> nn.Module:
  """Builds the PyTorch twin of ``sovr_jax.models.get_model(name, ...)`` (freshly initialised).

  Args:
    name: one of ``ARCHITECTURES``.
    num_classes: number of output logits.
    width: channel multiplier, as for the Flax model.
    mean, std: normalisation statistics, one value (broadcast) or one per input channel.
    input_shape: (C, H, W) of the inputs; C sets the first convolution's input channels, H and W
      matter for SmallCNN only (its fc1 size). Default: ``DEFAULT_INPUT_SHAPES[name]``.

  Raises:
    ValueError: unknown architecture or invalid arguments.
  """
  check_architecture(name)
  if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  if not width > 0:
    raise ValueError(f"width must be > 0, got {width!r}.")
  shape = tuple(int(s) for s in (input_shape or DEFAULT_INPUT_SHAPES[name]))
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"input_shape must be (C, H, W) with positive entries, got {input_shape!r}.")
  c = shape[0]
  kw = dict(num_classes=int(num_classes), width=float(width), mean=tuple(mean), std=tuple(std),
            in_channels=c)
  if name == "preact_resnet18":
    return PreActResNet18(**kw)
  if name == "resnet18":
    return ResNet18(**kw)
  if name == "wrn34_10":
    return WideResNet(depth=34, widen_factor=10, **kw)
  if name == "wrn28_10":
    return WideResNet(depth=28, widen_factor=10, **kw)
  return SmallCNN(image_size=shape[1:], **kw)


def _describe(keys: Sequence[str], limit: int = 12) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
  """Loads ``state_dict`` into ``model`` after checking that it fits the architecture exactly.

  The normalisation buffers ``mean``/``std`` may be absent; the model always keeps the values it
  was built with, and those in the state dict, if present, must equal them (a one-entry value
  broadcasts), since a mismatch means the weights belong to a model with other input statistics.

  Raises:
    ValueError: listing missing keys, unexpected keys and shape mismatches, or a mean/std
      mismatch.
  """
  expected = model.state_dict()
  given = dict(state_dict)
  for k in NORMALIZATION_BUFFERS:  # compared by value (1 entry broadcasts), never loaded
    if k not in given:
      continue
    g = given.pop(k).detach().cpu().float().reshape(-1)
    e = expected[k].detach().cpu().float().reshape(-1)
    if g.numel() != e.numel() and 1 in (g.numel(), e.numel()):
      g, e = torch.broadcast_tensors(g, e)
    if g.shape != e.shape or not torch.allclose(g, e):
      raise ValueError(
          f"The state dict's normalisation {k}={g.tolist()} differs from the model's "
          f"{e.tolist()}; build the model with the {k} recorded in model.json.")
  missing = [k for k in expected if k not in given and k not in NORMALIZATION_BUFFERS]
  unexpected = [k for k in given if k not in expected]
  shapes = [f"{k}: {tuple(given[k].shape)} given vs {tuple(expected[k].shape)} expected"
            for k in given if k in expected and tuple(given[k].shape) != tuple(expected[k].shape)]
  if missing or unexpected or shapes:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {_describe(missing)}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
    if shapes:
      parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:12])}")
    raise ValueError(
        f"The state dict does not fit {type(model).__name__} with these arguments ("
        + " | ".join(parts) + "). Check that the architecture, width, num_classes and input "
        "shape match the ones the weights were exported with (model.json).")
  model.load_state_dict(given, strict=False)
  return model


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_INPUT_SHAPES",
    "BasicBlock",
    "PreActBlock",
    "PreActResNet18",
    "ResNet18",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "build_torch_model",
    "check_architecture",
    "load_weights",
    "scaled",
]
