"""Tests for tfds with download=True: the original files, served from tmp_path as file:// URLs.

Nothing here touches the network: every URL in ``downloads.DOWNLOADS`` that a test loads is
replaced by a ``file://`` URL of a tiny fake in the real format (CIFAR's python-pickle tar.gz,
MNIST's IDX .gz files, SVHN's .mat), with its true MD5.
"""

import gzip
import hashlib
import io
import pathlib
import pickle
import socket
import struct
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from sovr_jax import data, downloads
from sovr_jax.errors import DataError, DatasetNotFoundError


def _md5(path) -> str:
  return hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture
def no_tf(monkeypatch):
  """Takes the no-tensorflow route whatever is installed (tensorflow is not, here)."""
  monkeypatch.setattr(data, "_tensorflow_available", lambda: False)


@pytest.fixture
def opened(monkeypatch):
  """Counts urlopen calls (the URLs opened), still opening them."""
  urls = []
  real = urllib.request.urlopen

  def counting(url, *args, **kwargs):
    urls.append(getattr(url, "full_url", url))  # a str or a urllib.request.Request
    return real(url, *args, **kwargs)

  monkeypatch.setattr(urllib.request, "urlopen", counting)
  return urls


def _serve(monkeypatch, name, files, md5=None):
  """Points DOWNLOADS[name] at the local files {key: path} (their true MD5 unless md5=)."""
  entry = {key: dict(url=path.as_uri(), md5=md5 or _md5(path), file_name=path.name)
           for key, path in files.items()}
  monkeypatch.setitem(downloads.DOWNLOADS, name, entry)
  return entry


def _load(name, tmp_path, **kwargs):
  kwargs.setdefault("download", True)
  kwargs.setdefault("val_size", 0)
  return data.load_dataset(name, source="tfds", data_dir=str(tmp_path / "tfds"),
                           cache_dir=str(tmp_path / "cache"), **kwargs)


def _cached(tmp_path, name, file_name):
  return tmp_path / "cache" / "downloads" / name / file_name


def _files_under(path):
  return sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# Fakes in the original formats.
# --------------------------------------------------------------------------


def _py2_string(b: bytes) -> bytes:
  """Pickle protocol 0's STRING opcode (a Python 2 str)."""
  return b"S" + repr(bytes(b))[1:].encode("ascii") + b"\n"


def _py2_uint8_array(a: np.ndarray) -> bytes:
  """A uint8 array as Python 2's numpy pickled it (protocol 0, numpy.core names)."""
  shape = b"".join(b"I%d\n" % n for n in a.shape)
  return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR"
          b"(I1\n(" + shape + b"tcnumpy\ndtype\n(S'u1'\nI0\nI1\ntR"
          b"(I3\nS'|'\nNNNI-1\nI-1\nI0\ntbI00\n" + _py2_string(a.tobytes()) + b"tb")


def _py2_batch(data_rows: np.ndarray, labels, label_key=b"labels") -> bytes:
  """A CIFAR-10 batch file as published: a Python 2 pickle of a dict with str keys."""
  out = [b"(d", _py2_string(b"batch_label"), _py2_string(b"training batch 1 of 5"), b"s",
         _py2_string(label_key), b"(l", b"".join(b"I%d\na" % int(y) for y in labels), b"s",
         _py2_string(b"data"), _py2_uint8_array(data_rows), b"s."]
  return b"".join(out)


def _tar_gz(path, members):
  """A .tar.gz of {member name: bytes}."""
  with tarfile.open(path, "w:gz") as tar:
    for name, blob in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return path


def _cifar10_fake(tmp_path, per_batch=2, num_test=3):
  """A cifar-10-python.tar.gz with Python 2 pickles; returns (path, rows, labels) per split."""
  rng = np.random.default_rng(0)
  members, rows, labels = {}, {"train": [], "test": []}, {"train": [], "test": []}
  for fname, n, split in ([(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)]
                          + [("test_batch", num_test, "test")]):
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    members[f"cifar-10-batches-py/{fname}"] = _py2_batch(x, y)
    rows[split].append(x)
    labels[split].append(y)
  members["cifar-10-batches-py/batches.meta"] = b"not read"
  members["cifar-10-batches-py/readme.html"] = b"<html></html>"
  src = tmp_path / "src"
  src.mkdir(exist_ok=True)
  path = _tar_gz(src / "cifar-10-python.tar.gz", members)
  return path, {s: np.concatenate(v) for s, v in rows.items()}, {
      s: np.concatenate(v) for s, v in labels.items()}


# --------------------------------------------------------------------------
# The four data sets.
# --------------------------------------------------------------------------


def test_cifar10_downloads_decodes_nhwc_and_then_reads_the_cache(tmp_path, monkeypatch, no_tf,
                                                                 opened):
  path, rows, labels = _cifar10_fake(tmp_path)
  entry = _serve(monkeypatch, "cifar10", {"archive": path})
  ds = _load("cifar10", tmp_path)
  assert opened == [entry["archive"]["url"]]
  assert (ds.num_train, ds.num_val, ds.num_test) == (10, 0, 3)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.mean == (0.4914, 0.4822, 0.4465)
  np.testing.assert_array_equal(ds.train_labels, labels["train"])  # batches 1..5 in order
  np.testing.assert_array_equal(ds.test_labels, labels["test"])
  # A row is 1,024 red, 1,024 green, 1,024 blue bytes, each 32x32 row-major:
  # pixel (row 1, column 2) of channel c is at c * 1024 + 1 * 32 + 2.
  for c in range(3):
    assert ds.train_images[7, 1, 2, c] == rows["train"][7, c * 1024 + 34]
    assert ds.test_images[2, 31, 0, c] == rows["test"][2, c * 1024 + 31 * 32]
  np.testing.assert_array_equal(ds.train_images[4, :, :, 1],
                                rows["train"][4, 1024:2048].reshape(32, 32))
  assert "tensorflow" not in sys.modules
  # The archive was kept (checked), with no temporary files left behind.
  cached = _cached(tmp_path, "cifar10", "cifar-10-python.tar.gz")
  assert _files_under(tmp_path / "cache") == [cached]
  assert _md5(cached) == entry["archive"]["md5"]

  # A second load reads the cache: no URL is opened, even when it is gone.
  path.unlink()
  again = _load("cifar10", tmp_path, val_size=2, seed=1)
  assert opened == [entry["archive"]["url"]]
  assert (again.num_train, again.num_val) == (8, 2)


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch, no_tf, opened):
  rng = np.random.default_rng(1)
  x = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", 5),
                                                                     ("test", 2))}
  fine = {"train": np.array([0, 99, 50, 7, 13]), "test": np.array([99, 1])}
  members = {}
  for split in ("train", "test"):
    # A modern pickle (protocol 4, numpy 2's numpy._core names) with bytes keys.
    members[f"cifar-100-python/{split}"] = pickle.dumps(
        {b"data": x[split], b"fine_labels": fine[split].tolist(),
         b"coarse_labels": (fine[split] // 5).tolist(),
         b"filenames": [b"a.png"] * len(fine[split])}, protocol=4)
  members["cifar-100-python/meta"] = b"not read"
  (tmp_path / "src").mkdir()
  path = _tar_gz(tmp_path / "src" / "cifar-100-python.tar.gz", members)
  _serve(monkeypatch, "cifar100", {"archive": path})
  ds = _load("cifar100", tmp_path)
  assert ds.num_classes == 100 and ds.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(ds.train_labels, fine["train"])
  np.testing.assert_array_equal(ds.test_labels, fine["test"])
  assert ds.test_images[1, 0, 5, 2] == x["test"][1, 2048 + 5]
  assert len(opened) == 1


def _idx_gz(path, array: np.ndarray):
  header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
  return path


def _mnist_files(tmp_path):
  rng = np.random.default_rng(2)
  src = tmp_path / "src"
  src.mkdir(exist_ok=True)
  arrays = {"train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
            "train_labels": np.array([5, 0, 4, 1, 9, 2], dtype=np.uint8),
            "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
            "test_labels": np.array([7, 2, 1], dtype=np.uint8)}
  names = {k: v["file_name"] for k, v in downloads.DOWNLOADS["mnist"].items()}
  files = {k: _idx_gz(src / names[k], a) for k, a in arrays.items()}
  return files, arrays


def test_mnist_idx_files(tmp_path, monkeypatch, no_tf, opened):
  files, arrays = _mnist_files(tmp_path)
  _serve(monkeypatch, "mnist", files)
  ds = _load("mnist", tmp_path)
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  assert (ds.num_train, ds.num_test) == (6, 3)
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train_images"])
  np.testing.assert_array_equal(ds.test_labels, [7, 2, 1])
  assert ds.train_labels.dtype == np.int32
  assert len(opened) == 4
  _load("mnist", tmp_path)
  assert len(opened) == 4
  assert "tensorflow" not in sys.modules


def test_svhn_mat_labels_10_become_0(tmp_path, monkeypatch, no_tf, opened):
  sio = pytest.importorskip("scipy.io")
  rng = np.random.default_rng(3)
  src = tmp_path / "src"
  src.mkdir()
  xs, files = {}, {}
  # The real files hold X as uint8 [32, 32, 3, N] and y as MATLAB doubles [N, 1].
  for split, y, dtype in (("train", [10, 1, 9, 10], np.float64), ("test", [3, 10], np.uint8)):
    xs[split] = rng.integers(0, 256, (32, 32, 3, len(y)), dtype=np.uint8)
    files[split] = src / f"{split}_32x32.mat"
    sio.savemat(files[split], {"X": xs[split], "y": np.array(y, dtype)[:, None]})
  _serve(monkeypatch, "svhn_cropped", files)
  ds = _load("svhn_cropped", tmp_path)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  np.testing.assert_array_equal(ds.train_labels, [0, 1, 9, 0])
  np.testing.assert_array_equal(ds.test_labels, [3, 0])
  assert ds.train_images[2, 4, 5, 1] == xs["train"][4, 5, 1, 2]  # X is [H, W, C, N]
  np.testing.assert_array_equal(ds.test_images[1], xs["test"][..., 1])
  assert len(opened) == 2


def test_svhn_without_scipy_says_pip_install_scipy_before_downloading(tmp_path, monkeypatch,
                                                                       no_tf, opened):
  monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io raises ImportError
  with pytest.raises(DataError, match=r"pip install scipy"):
    _load("svhn_cropped", tmp_path)
  assert opened == []


# --------------------------------------------------------------------------
# Checksums, failures, offline.
# --------------------------------------------------------------------------


def test_wrong_checksum_is_refused_and_nothing_is_cached(tmp_path, monkeypatch, no_tf):
  path, _, _ = _cifar10_fake(tmp_path)
  wrong = "0123456789abcdef0123456789abcdef"
  entry = _serve(monkeypatch, "cifar10", {"archive": path}, md5=wrong)
  with pytest.raises(DataError) as info:
    _load("cifar10", tmp_path)
  msg = str(info.value)
  for part in (entry["archive"]["url"], wrong, _md5(path), "expected"):
    assert part in msg
  assert _files_under(tmp_path / "cache") == []


def test_cached_file_with_a_wrong_checksum_is_named_not_used(tmp_path, monkeypatch, no_tf,
                                                             opened):
  path, _, _ = _cifar10_fake(tmp_path)
  _serve(monkeypatch, "cifar10", {"archive": path})
  cached = _cached(tmp_path, "cifar10", "cifar-10-python.tar.gz")
  cached.parent.mkdir(parents=True)
  cached.write_bytes(path.read_bytes()[:100])  # A truncated copy put there by hand.
  with pytest.raises(DataError, match="delete it") as info:
    _load("cifar10", tmp_path)
  assert str(cached) in str(info.value) and _md5(path) in str(info.value)
  assert opened == [] and cached.exists()


def test_unreachable_url_says_what_was_tried_and_how_to_fix(tmp_path, monkeypatch, no_tf):
  path, _, _ = _cifar10_fake(tmp_path)
  url = (tmp_path / "offline" / "cifar-10-python.tar.gz").as_uri()
  md5 = _md5(path)
  monkeypatch.setitem(downloads.DOWNLOADS, "cifar10", {"archive": dict(
      url=url, md5=md5, file_name="cifar-10-python.tar.gz")})
  with pytest.raises(DatasetNotFoundError) as info:
    _load("cifar10", tmp_path)
  msg = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  cached = _cached(tmp_path, "cifar10", "cifar-10-python.tar.gz")
  for part in ("cifar10", "not prepared", "tensorflow is not installed", url, "URLError",
               f"{url} (md5 {md5}) -> {cached}", "tfds build cifar10",
               "--config.data.source=image_folder", "embedded"):
    assert part in msg, part
  assert _files_under(tmp_path / "cache") == []

  # The fix: the file copied to the named path is checked and read, offline.
  cached.parent.mkdir(parents=True, exist_ok=True)
  cached.write_bytes(path.read_bytes())
  assert _load("cifar10", tmp_path).num_train == 10


def test_no_internet_lists_every_file_of_the_data_set(tmp_path, monkeypatch, no_tf):
  files, _ = _mnist_files(tmp_path)
  _serve(monkeypatch, "mnist", files)

  def offline(url, *args, **kwargs):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(DatasetNotFoundError, match="name resolution") as info:
    _load("mnist", tmp_path)
  for spec in downloads.DOWNLOADS["mnist"].values():
    assert str(_cached(tmp_path, "mnist", spec["file_name"])) in str(info.value)
  assert _files_under(tmp_path / "cache") == []


def test_corrupt_file_with_matching_checksum_is_a_data_error(tmp_path, monkeypatch, no_tf):
  files, _ = _mnist_files(tmp_path)
  files["test_labels"].write_bytes(files["test_labels"].read_bytes()[:-6])
  _serve(monkeypatch, "mnist", files)
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
    _load("mnist", tmp_path)


def test_pickles_run_nothing_and_unsafe_tar_members_are_refused(tmp_path, monkeypatch, no_tf):
  marker = tmp_path / "pwned"
  evil = b"cos\nsystem\n(" + _py2_string(f"touch {marker}".encode()) + b"tR."
  (tmp_path / "src").mkdir()
  members = {f"cifar-10-batches-py/{f}": evil
             for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
  path = _tar_gz(tmp_path / "src" / "cifar-10-python.tar.gz", members)
  _serve(monkeypatch, "cifar10", {"archive": path})
  with pytest.raises(DataError, match=r"os\.system is not allowed"):
    _load("cifar10", tmp_path)
  assert not marker.exists()

  path2 = _tar_gz(tmp_path / "src" / "cifar-10-python2.tar.gz",
                  {"cifar-10-batches-py/../../escape": b"x"})
  _serve(monkeypatch, "cifar10", {"archive": path2})
  with pytest.raises(DataError, match="unsafe member"):
    _load("cifar10", tmp_path)
  assert not (tmp_path / "escape").exists()


# --------------------------------------------------------------------------
# The switch and the order of routes.
# --------------------------------------------------------------------------


def test_download_false_keeps_the_old_behaviour(tmp_path, monkeypatch, opened):
  path, _, _ = _cifar10_fake(tmp_path)
  _serve(monkeypatch, "cifar10", {"archive": path})
  with pytest.raises(DatasetNotFoundError) as info:
    _load("cifar10", tmp_path, download=False)
  assert "download=False" in str(info.value) and "--config.data.download=True" in str(
      info.value)
  assert opened == [] and not (tmp_path / "cache").exists()
  with pytest.raises(DataError, match="download must be True or False"):
    _load("cifar10", tmp_path, download="yes")


def test_prepared_tfds_data_comes_first_without_network(tmp_path, opened):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = _load("mnist", tmp_path)
  assert ds.num_train == 6 and opened == []
  assert not (tmp_path / "cache").exists()


def test_with_tensorflow_tfds_downloads_it(tmp_path, monkeypatch, opened):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
  calls = []

  def fake_load(name, *, split, batch_size, data_dir, download):
    calls.append(download)
    if not download:
      raise RuntimeError("not prepared")  # tfds's own error for a missing data set
    return [{"image": np.full((n, 28, 28, 1), 7, np.uint8), "label": np.arange(n) % 10}
            for n in (5, 2)]

  monkeypatch.setattr(tfds, "load", fake_load)
  monkeypatch.setattr(tfds, "as_numpy", lambda tree: tree)
  ds = _load("mnist", tmp_path)
  assert calls == [False, True]  # The prepared data_dir first, then tfds's download.
  assert (ds.num_train, ds.num_test) == (5, 2) and ds.train_images[0, 0, 0, 0] == 7
  assert opened == [] and not (tmp_path / "cache").exists()

  def failing_load(name, *, split, batch_size, data_dir, download):
    raise ConnectionError("Network is unreachable")

  monkeypatch.setattr(tfds, "load", failing_load)
  with pytest.raises(DatasetNotFoundError, match="asked tfds") as info:
    _load("mnist", tmp_path)
  assert "Network is unreachable" in str(info.value)
  assert "tfds build mnist" in str(info.value)
