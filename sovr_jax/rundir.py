"""A training run's directory: its file names, config, lock, metrics and provenance.

Everything that reads or writes a workdir (training, export, evaluation, the study) takes
its file names and its config from here. No torch, and no JAX at import time.

    W/config.json            the run's config, written once when training starts (atomic)
    W/config_changes.jsonl   the allowed changes of later resumes (more epochs, ...), one line each
    W/metrics.jsonl          one line per log interval and one per epoch
    W/checkpoints/<step>/    the latest checkpoints; W/best/<step>/ the best by validation
    W/corrupt/               unreadable checkpoints, moved aside (never deleted)
    W/report.json            the final test-set report; W/margins.json, W/margins.png
    W/export/                the PyTorch export (model.pt, model.json)
    W/autoattack.json, W/autoattack_jax.json, W/autoattack_compare.json   AutoAttack results
    W/.lock                  held by the training process (its pid, host and command inside)

Guarantees (docs/reliability.md): one training process per workdir at a time; config.json is
never rewritten, and a resume that would train something else is refused with the field, its
old and its new value; a torn last line of metrics.jsonl (a crash mid-append) is dropped with
a message; a torn config.json is rebuilt from the copy in the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import socket
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from sovr_jax import jsonio
from sovr_jax.errors import WorkdirError, WorkdirLockedError

CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
MARGINS_JSON = "margins.json"
MARGINS_PNG = "margins.png"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
CORRUPT_DIR = "corrupt"
EXPORT_DIR = "export"
#: AutoAttack results (sovr_jax.evaluation.schema), per engine, and the side-by-side file.
AUTOATTACK_FILES = {"reference": "autoattack.json", "jax": "autoattack_jax.json"}
AUTOATTACK_COMPARE_FILE = "autoattack_compare.json"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
CHECKPOINT_KINDS = ("best", "latest")

#: Fields that a resumed run may change, because they do not change what the steps already
#: taken trained (a prefix ending in "." covers a section). Each change is recorded in
#: config_changes.jsonl and in the report; any other change is refused.
RESUMABLE_FIELDS = ("train.epochs", "train.log_every_steps", "train.steps_per_dispatch",
                    "train.clean_acc_metric", "attack.fold_bn",
                    "eval.", "checkpoint.", "data.path", "data.data_dir", "data.cache_dir",
                    "data.download")


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def checkpoint_dir(workdir: str, kind: str) -> str:
  """W/best or W/checkpoints."""
  if kind not in CHECKPOINT_KINDS:
    raise ValueError(f"checkpoint must be one of {CHECKPOINT_KINDS}, got {kind!r}.")
  return os.path.join(workdir, BEST_DIR if kind == "best" else CHECKPOINTS_DIR)


def checkpoint_steps(workdir: str, kind: str = "best") -> list[int]:
  """The saved steps under W/best or W/checkpoints, newest first."""
  directory = checkpoint_dir(workdir, kind)
  if not os.path.isdir(directory):
    return []
  return sorted((int(d) for d in os.listdir(directory)
                 if d.isdigit() and os.path.isdir(os.path.join(directory, d))), reverse=True)


def read_checkpoint_meta(workdir: str, kind: str, step: int) -> dict[str, Any] | None:
  """The JSON metadata saved with a checkpoint (epoch, best_val_pgd, config, digest), read
  without Orbax; None if missing or unreadable."""
  p = os.path.join(checkpoint_dir(workdir, kind), str(step), "meta", "metadata")
  try:
    with open(p) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None


# --------------------------------------------------------------------------------------------
# Provenance.
# --------------------------------------------------------------------------------------------


_DISTRIBUTIONS = {"orbax.checkpoint": "orbax-checkpoint"}  # where a module's name is not its
                                                           # distribution's


def _version(mod: str) -> str | None:
  """``mod.__version__`` where ``mod`` is imported, else its installed distribution's version
  (torch is not imported just to be named: 2 s, and a CUDA torch beside jax on a GPU), else
  the module's, imported; None where it is not installed."""
  if sys.modules.get(mod) is None:
    try:
      return importlib.metadata.version(_DISTRIBUTIONS.get(mod, mod))
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    return str(__import__(mod, fromlist=["__version__"]).__version__)
  except (ImportError, AttributeError):
    return None


def versions(*extra: str) -> dict[str, str]:
  """Python and the versions of the libraries a result depends on (those installed)."""
  out = {"python": platform.python_version()}
  for mod in ("sovr_jax", "jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex",
              "numpy") + extra:
    v = _version(mod)
    if v is not None:
      out[mod] = v
  return out


def command() -> str:
  """The command line of this process, as typed (``python -m module args``)."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  head = (f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None and spec.name
          else f"python {sys.argv[0]}")
  return " ".join([head] + sys.argv[1:])


# Vector extensions that can change how XLA's CPU backend (and oneDNN) compiles a computation:
# it targets the host's, so the same code and versions may round differently on another CPU
# (the quickstart's figures differ between two CPUs, README).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve")


def cpu_from_cpuinfo(text: str) -> dict[str, Any]:
  """The CPU's model and vector extensions, from the text of Linux's /proc/cpuinfo (x86's
  "model name" and "flags", or Arm's "CPU part" and "Features")."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() not in fields:
      fields[key.strip()] = value.strip()
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or ""
  return {"model": model, "isa": [f for f in _ISA_FLAGS if f in flags]}


def cpu() -> dict[str, Any]:
  """The host CPU (model, vector extensions, cores): results computed on a CPU depend on it."""
  try:
    with open("/proc/cpuinfo") as f:
      out = cpu_from_cpuinfo(f.read())
  except OSError:
    out = {"model": "", "isa": []}
  out["model"] = out["model"] or platform.processor() or platform.machine()
  out["cores"] = os.cpu_count()
  return out


def provenance(*extra_versions: str) -> dict[str, Any]:
  """Versions, devices, host and its CPU, command and time: what every result file records."""
  out = {"versions": versions(*extra_versions), "command": command(),
         "host": socket.gethostname(), "cpu": cpu(),
         "created": datetime.datetime.now().isoformat(timespec="seconds")}
  jax = sys.modules.get("jax")
  if jax is not None:
    out["devices"] = [str(d) for d in jax.devices()]
    out["device_kind"] = jax.devices()[0].device_kind
  return out


# --------------------------------------------------------------------------------------------
# The lock.
# --------------------------------------------------------------------------------------------


class WorkdirLock:
  """An exclusive ``flock`` on W/.lock for the life of a training process (or on W/``name``
  for another kind of process, ``what``: an AutoAttack evaluation locks its result file).

  The kernel drops the lock when the process dies (SIGKILL included), so a crashed run never
  leaves a stale lock. The file holds the holder's pid, host, start time and command, which a
  refused second run prints.
  """

  def __init__(self, workdir: str, name: str = LOCK_FILE, what: str = "training run"):
    self.workdir, self.what = workdir, what
    self.path = os.path.join(workdir, name)
    self._fd: int | None = None

  def holder(self) -> str:
    try:
      with open(self.path) as f:
        h = json.load(f)
      return (f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}")
    except (OSError, ValueError, KeyError):
      return "a process that has not written its name yet"

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
          f"Workdir {self.workdir} is in use by another {self.what} ({self.holder()}). Wait "
          f"for it to finish or stop it, or use another "
          f"{'--workdir' if self.what == 'training run' else '--out'}.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": command()}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# --------------------------------------------------------------------------------------------
# The config.
# --------------------------------------------------------------------------------------------


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def _named(field: str, names: Sequence[str]) -> bool:
  """``field`` is one of ``names``, or in a section of them (a name ending in ".")."""
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in names)


def _resumable(field: str, allow: Sequence[str] = ()) -> bool:
  return _named(field, tuple(RESUMABLE_FIELDS) + tuple(allow))


def config_diff(old: dict[str, Any], new: dict[str, Any],
                defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
  """{field: (old value, new value)} of every leaf that differs; a field missing from
  ``old`` (a config written before the field existed) counts as its default."""
  a, b = _leaves(old), _leaves(new)
  d = _leaves(defaults or {})
  out = {}
  for k in sorted(set(a) | set(b)):
    va = a.get(k, d.get(k))
    if va != b.get(k):
      out[k] = (va, b.get(k))
  return out


def read_config(workdir: str) -> dict[str, Any]:
  """The full config dict of a run, from W/config.json.

  Raises:
    WorkdirError (a FileNotFoundError for a missing workdir or config.json, a ValueError for
      a torn one): the message says what to pass instead.
  """
  if not os.path.isdir(workdir):
    raise _NotARun(f"Workdir {workdir!r} does not exist. Pass the --workdir of a training run "
                   f"(python -m sovr_jax.main --config ... --workdir W).")
  p = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(p):
    raise _NotARun(f"{p} not found: {workdir!r} is not a sovr_jax training workdir. Pass the "
                   f"--workdir given to python -m sovr_jax.main.")
  try:
    with open(p) as f:
      d = json.load(f)
  except ValueError as e:
    raise WorkdirError(f"{p} is unreadable ({e}). Run the training command on this workdir "
                       f"once: it rebuilds config.json from the newest checkpoint.") from e
  if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
    raise WorkdirError(f"{p} has no 'config' section; it was not written by sovr_jax.main. "
                       f"Pass the --workdir of a sovr_jax training run.")
  return d["config"]


class _NotARun(WorkdirError, FileNotFoundError):
  """The path is not a training workdir."""


def _write_config(workdir: str, config: dict[str, Any]) -> None:
  jsonio.write_json_atomic(os.path.join(workdir, CONFIG_FILE),
                           {"config": config, **provenance()})


def _move_aside(p: str, why: str) -> str:
  dst = f"{p}.{why}-{int(time.time())}"
  os.replace(p, dst)
  return dst


def _config_from_checkpoints(workdir: str) -> dict[str, Any] | None:
  for kind in ("latest", "best"):
    for step in checkpoint_steps(workdir, kind):
      meta = read_checkpoint_meta(workdir, kind, step)
      if meta and isinstance(meta.get("config"), dict):
        return meta["config"]
  return None


def has_checkpoint(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir, "latest") or checkpoint_steps(workdir, "best"))


def start_or_resume(workdir: str, config: dict[str, Any], defaults: dict[str, Any], *,
                    allow: Sequence[str] = (), log=print,
                    guard: Callable[[dict[str, tuple[Any, Any]]], dict[str, str]] | None = None
                    ) -> list[dict[str, Any]]:
  """Writes W/config.json on a run's first start; on a resume checks ``config`` against it.

  Call it with the workdir locked (process 0 only). A workdir without a checkpoint holds no
  training: its config.json (e.g. from a start that failed) is moved aside and replaced. With
  a checkpoint, every field that changes what is trained must match; ``RESUMABLE_FIELDS``
  and the fields in ``allow`` (an explicit request, e.g. a lower train.lr after a
  divergence) may change, and each such change is appended to W/config_changes.jsonl.
  ``guard(diff)`` names, with a reason, the fields of ``RESUMABLE_FIELDS`` that would change
  this run's remaining steps (e.g. more epochs under a
  cosine schedule); those, too, change only when named in ``allow``. A torn
  config.json is moved aside and rebuilt from the config saved in the newest checkpoint.

  Returns:
    Every recorded change of this run so far (one dict per resume that changed something).

  Raises:
    WorkdirError: the config differs in a field that changes what is trained.
  """
  p = os.path.join(workdir, CONFIG_FILE)
  trained = has_checkpoint(workdir)
  if not os.path.exists(p):
    if trained:
      old = _config_from_checkpoints(workdir)
      if old is not None:
        log(f"WARNING: {p} was missing; rebuilt it from the config saved in the newest "
            f"checkpoint.")
        _write_config(workdir, old)
    if not os.path.exists(p):
      _write_config(workdir, config)
      return []
  try:
    old = read_config(workdir)
  except WorkdirError as e:
    saved = _config_from_checkpoints(workdir) if trained else None
    if trained and saved is None:
      raise WorkdirError(f"{p} is unreadable and no checkpoint holds a copy of the config: "
                         f"the settings of the trained model are unknown. Use a new "
                         f"--workdir.") from e
    dst = _move_aside(p, "torn")
    log(f"WARNING: {p} was unreadable ({e.__cause__ or e}); moved it to {dst} and "
        + ("rebuilt it from the config saved in the newest checkpoint." if trained else
           "started afresh (no checkpoint was saved yet)."))
    _write_config(workdir, saved if trained else config)
    old = saved if trained else config
  diff = config_diff(old, config, defaults)
  if not diff:
    return read_config_changes(workdir)
  if not trained:
    dst = _move_aside(p, "unused")
    log(f"The workdir held no checkpoint, so its config.json (of a run that never saved one) "
        f"was moved to {dst} and replaced by this run's.")
    _write_config(workdir, config)
    return []
  reasons = guard(diff) if guard else {}
  moved = {k: why for k, why in reasons.items() if k in diff and not _named(k, allow)}
  if moved:
    raise WorkdirError(
        f"Workdir {workdir}: resuming with " + "; ".join(
            f"{k} {diff[k][0]!r} -> {diff[k][1]!r} would change the rest of this run: {why}"
            for k, why in moved.items())
        + f". Use a new --workdir, or pass --allow_change={','.join(moved)} to accept it "
        f"(the change is recorded).")
  refused = {k: v for k, v in diff.items() if not _resumable(k, allow)}
  if refused:
    desc = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in refused.items())
    raise WorkdirError(
        f"Workdir {workdir} holds a run trained with other settings ({desc}). A resumed run "
        f"must train what it started, so these fields cannot change. Rerun with the run's "
        f"settings ({p}), use a new --workdir for the new settings, or, to change them on "
        f"purpose from the last checkpoint on, pass --allow_change="
        f"{','.join(refused)} (the change is recorded).")
  record = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command(), "changes": {k: list(v) for k, v in diff.items()}}
  jsonio.append_jsonl(os.path.join(workdir, CONFIG_CHANGES_FILE), record)
  log("Resuming with changed settings (recorded in "
      f"{CONFIG_CHANGES_FILE}): " + "; ".join(f"{k}: {a!r} -> {b!r}"
                                               for k, (a, b) in diff.items()))
  return read_config_changes(workdir)


def read_config_changes(workdir: str) -> list[dict[str, Any]]:
  return read_jsonl(os.path.join(workdir, CONFIG_CHANGES_FILE))[0]


# --------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------


def read_jsonl(p: str) -> tuple[list[dict[str, Any]], list[int]]:
  """(records, line numbers that could not be parsed) of a JSON-lines file; a missing file is
  empty. A crash in the middle of an append leaves a torn last line: it is among the
  unparsable ones, never an exception."""
  records, bad = [], []
  if not os.path.exists(p):
    return records, bad
  with open(p) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        bad.append(i)
        continue
      if isinstance(rec, dict):
        records.append(rec)
      else:
        bad.append(i)
  return records, bad


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of W/metrics.jsonl (unparsable lines skipped)."""
  return read_jsonl(os.path.join(workdir, METRICS_FILE))[0]


def truncate_metrics(workdir: str, step: int, log=print) -> None:
  """On resume: keeps the metric lines up to the restored ``step``, drops later ones (they
  will be written again) and unparsable ones (saying so), atomically."""
  p = os.path.join(workdir, METRICS_FILE)
  records, bad = read_jsonl(p)
  if not records and not bad:
    return
  if bad:
    log(f"WARNING: dropped {len(bad)} unreadable line(s) of {p} (line "
        f"{', '.join(map(str, bad))}; a crash in the middle of a write).")
  keep = [r for r in records if r.get("step", 0) <= step]
  if bad or len(keep) != len(records):
    jsonio.write_jsonl_atomic(p, keep)


# --------------------------------------------------------------------------------------------
# Restoring a trained model (JAX, imported lazily).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RestoredRun:
  """A training run's checkpoint, restored into a float32 Flax model."""

  workdir: str
  config: dict[str, Any]        # the full config dict from config.json
  cfg: Any                      # the same as an ml_collections.ConfigDict
  dataset: Any                  # sovr_jax.data.Dataset
  model: Any                    # the Flax model, float32 compute
  variables: dict[str, Any]     # {"params", "batch_stats"} as numpy arrays
  step: int
  meta: dict[str, Any]          # checkpoint metadata (epoch, best_val_pgd, best_epoch)
  checkpoint: str               # "best" or "latest"
  checkpoint_path: str


def restore_run(workdir: str, *, checkpoint: str = "best", dataset: Any = None) -> RestoredRun:
  """Restores the newest readable ``checkpoint`` ("best" or "latest") of a training run.

  The Flax model is rebuilt from the run's config.json with float32 compute (whatever the
  run's precision), and the state is restored by ``checkpoint.Checkpointer`` (digest check,
  fallback to the previous checkpoint of an unreadable one). ``dataset`` (the run's
  ``experiment.load_data(cfg)``) is loaded if not given. Needs no torch.

  Raises:
    WorkdirError (FileNotFoundError): no workdir, no config.json, or no checkpoint of that kind.
    CheckpointError: checkpoints exist but none can be read into the model.
  """
  workdir = os.path.abspath(workdir)
  config = read_config(workdir)
  steps = checkpoint_steps(workdir, checkpoint)
  if not steps:
    if checkpoint == "best":
      hint = ("The best checkpoint is chosen by validation PGD accuracy; a run with "
              "data.val_size=0 or eval.every_epochs=0 has none. Use --checkpoint latest, or "
              "train (longer) first.")
    else:
      hint = "Train first: python -m sovr_jax.main --config ... --workdir " + workdir
    raise _NotARun(f"No {checkpoint} checkpoint in {checkpoint_dir(workdir, checkpoint)}. "
                   f"{hint}")

  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from sovr_jax import checkpoint as ckpt_lib
  from sovr_jax import config_lib, experiment, train
  # pylint: enable=import-outside-toplevel

  cfg = config_lib.from_dict(config)
  ds = dataset if dataset is not None else experiment.load_data(cfg)
  model = experiment.build_model(cfg, ds, dtype=jnp.float32)
  tx = train.make_optimizer(cfg, train.make_schedule(cfg, 1))
  # The state's shapes only, on this process's first device: initialising the model (op by
  # op, each initializer compiled) only to overwrite it cost seconds per restore on a CPU.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      jax.eval_shape(lambda: train.create_train_state(jax.random.PRNGKey(0), model,
                                                      ds.image_shape, tx)))
  keep = int(cfg.get("checkpoint", {}).get("keep", 2))
  with ckpt_lib.Checkpointer(workdir, keep=keep) as checkpointer:
    restored = checkpointer.restore(target, best=checkpoint == "best")
  if restored is None:  # the directories were emptied between the listing and the restore
    raise _NotARun(f"No {checkpoint} checkpoint could be found in {workdir}.")
  state, meta = restored
  step = int(jax.device_get(state.step))
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  meta = {k: v for k, v in meta.items() if k in ("epoch", "best_val_pgd", "best_epoch")}
  return RestoredRun(workdir=workdir, config=config, cfg=cfg, dataset=ds, model=model,
                     variables=variables, step=step, meta=meta, checkpoint=checkpoint,
                     checkpoint_path=os.path.join(checkpoint_dir(workdir, checkpoint),
                                                  str(step)))


@contextlib.contextmanager
def locked(workdir: str, enabled: bool = True) -> Iterator[WorkdirLock | None]:
  """``with locked(W):`` holds W's lock (a no-op where ``enabled`` is False, e.g. on
  processes other than 0 of a multi-host run)."""
  if not enabled:
    yield None
    return
  with WorkdirLock(workdir) as lock:
    yield lock
