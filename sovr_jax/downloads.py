"""The original files of CIFAR-10/100, MNIST and SVHN: downloaded with checksums, and read.

Where tensorflow is not installed (e.g. a Colab TPU runtime), ``data.load_dataset(...,
source="tfds", download=True)`` gets a data set that is not prepared from its original files
(``DOWNLOADS``) into ``<cache_dir>/downloads/<name>/``: each file is downloaded to a temporary
file, checked against its published MD5 (or SHA-256) and only then renamed into place; a
cached file is checked again every time it is used. The readers turn the files into uint8
NHWC arrays and int labels: CIFAR's python pickles (read by an unpickler that allows numpy's
array globals only; https://www.cs.toronto.edu/~kriz/cifar.html), MNIST's IDX files
(http://yann.lecun.com/exdb/mnist/), SVHN's ``.mat`` files (labels 10 -> 0, as TFDS;
http://ufldl.stanford.edu/housenumbers/).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from typing import Any

import numpy as np

from sovr_jax.errors import DataError

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
_SVHN = "http://ufldl.stanford.edu/housenumbers/"


def _file(url: str, md5: str) -> dict[str, str]:
  """A ``DOWNLOADS`` entry, kept under the name its URL ends with."""
  return dict(url=url, md5=md5, file_name=url.rsplit("/", 1)[1])


DOWNLOADS: dict[str, dict[str, dict[str, str]]] = {
    "cifar10": {"archive": _file("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                 "c58f30108f718f92721af3b95e74349a")},
    "cifar100": {"archive": _file("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                  "eb9058c3a382ffc7106e4002c42a8d85")},
    "mnist": {
        "train_images": _file(_MNIST_MIRROR + "train-images-idx3-ubyte.gz",
                              "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train_labels": _file(_MNIST_MIRROR + "train-labels-idx1-ubyte.gz",
                              "d53e105ee54ea40749a09fcbcd1e9432"),
        "test_images": _file(_MNIST_MIRROR + "t10k-images-idx3-ubyte.gz",
                             "9fb629c4189551a2d022fa330f9573f3"),
        "test_labels": _file(_MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz",
                             "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    "svhn_cropped": {
        "train": _file(_SVHN + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
        "test": _file(_SVHN + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    },
}
_DOWNLOAD_TIMEOUT_S = 60.0      # per socket operation, not for the whole file
_DOWNLOAD_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 1 << 20   # no progress bar for smaller files (MNIST's labels)


class DownloadFailed(Exception):
  """A download failed for a network reason; the message says how (the cause is chained)."""


_USER_AGENT = "sovr_jax (python urllib)"  # Some hosts refuse urllib's default agent.


def download_dir(cache_dir: str | None, name: str) -> str:
  return os.path.join(os.path.expanduser(cache_dir), "downloads", name)


def checksum_spec(spec: dict[str, str]) -> tuple[str, str]:
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
    DownloadFailed: a network failure (URLError covers HTTP errors, DNS, refused
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
        raise DownloadFailed(f"{type(e).__name__}: {e}") from e
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


def fetch(spec: dict[str, str], dest: str) -> None:
  """Makes sure ``dest`` holds the checked file of ``spec``, downloading it if missing."""
  algo, expected = checksum_spec(spec)
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
        parts = [q for q in member.name.replace("\\", "/").split("/") if q not in ("", ".")]
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
  num_classes = {"cifar10": 10, "cifar100": 100}[name]
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
  for split in ("train", "test"):
    x = _read_idx(paths[f"{split}_images"], 3)
    y = _read_idx(paths[f"{split}_labels"], 1)
    if x.shape[0] != y.shape[0] or (y.size and y.max() > 9):
      raise DataError(f"MNIST {split}: {x.shape[0]} images but {y.shape[0]} labels (or a "
                      f"label above 9), in {paths[f'{split}_images']!r} and "
                      f"{paths[f'{split}_labels']!r}.")
    out += [x[..., None], y.astype(np.int32)]
  return tuple(out)


def import_scipy_io():
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
  sio = import_scipy_io()
  out = []
  for split in ("train", "test"):
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


READERS = {
    "cifar10": functools.partial(_read_cifar, "cifar10"),
    "cifar100": functools.partial(_read_cifar, "cifar100"),
    "mnist": _read_mnist,
    "svhn_cropped": _read_svhn,
}
