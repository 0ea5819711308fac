"""Multi-process training on one machine: 2 processes x 1 CPU device, gloo collectives.

``python -m sovr_jax.main --coordinator_address 127.0.0.1:PORT --num_processes 2
--process_id I`` is launched twice (localhost only, a port the OS picked) on configs/tiny.py
for one epoch, and checked against itself, against a single process with 2 devices (the same
mesh size, so the same global batches), and for resuming:

  (a) both processes hold the same parameters, metrics and report;
  (b) they equal the single-process run's to float tolerance;
  (c) the checkpoint the 2 processes wrote resumes in a single process ("Resumed"), and
  (d) in 2 processes again, to the same parameters as (c).

Also: only process 0 prints, writes metrics.jsonl once per record, and ``global_batch``
puts each example where it belongs even when the mesh lists the other process's device
first. Each process runs this file as a worker (``python tests/test_multihost.py OUT --
<sovr_jax.main flags>``), which records what the process holds in memory (the state at each
checkpoint save, its metric records, its report) under OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # per launch; a run takes well under a minute here
BASE_FLAGS = ["--config", "configs/tiny.py", "--config.train.epochs=1"]


# --------------------------------------------------------------------------------------------
# The worker (runs in each launched process).
# --------------------------------------------------------------------------------------------


def _check_global_batch(out: dict) -> None:
  """global_batch on the default mesh and on one that lists the devices in reverse."""
  import jax  # pylint: disable=import-outside-toplevel
  from sovr_jax import sharding  # pylint: disable=import-outside-toplevel

  for name, devices in (("default", jax.devices()), ("reversed", jax.devices()[::-1])):
    mesh = sharding.make_mesh(devices)
    n = 4 * mesh.devices.size
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int32)
    gx, gy = sharding.global_batch((x, y), mesh)
    gather = jax.jit(lambda a: a, out_shardings=sharding.replicated(mesh))
    rows = sharding.local_rows(sharding.batch_sharded(mesh), (n,))
    out[f"global_batch_{name}"] = {
        "ok": bool(np.array_equal(jax.device_get(gather(gx)), x)
                   and np.array_equal(jax.device_get(gather(gy)), y)),
        "local_rows": str(rows)}
    # A stacked [steps, batch, ...] batch is split along axis 1.
    xs = np.stack([x, x + 1000])
    gxs = sharding.global_batch(xs, mesh, batch_axis=1)
    out[f"global_batch_{name}"]["stacked_ok"] = bool(
        np.array_equal(jax.device_get(gather(gxs)), xs))


def _worker(argv: list[str]) -> None:
  out_dir, sep, main_argv = argv[0], argv[1], argv[2:]
  assert sep == "--", argv
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel
  from absl import app  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from sovr_jax import checkpoint, experiment, metric_writers
  from sovr_jax import main as main_lib  # pylint: disable=import-outside-toplevel

  def path(kind: str) -> str:
    return os.path.join(out_dir, f"p{jax.process_index()}_{kind}")

  save = checkpoint.Checkpointer.save

  def recording_save(self, state, meta, *, best=False):
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats, "step": state.step}))[0]
    np.savez(path("state.npz"), **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    return save(self, state, meta, best=best)

  write = metric_writers.MetricWriter.write

  def recording_write(self, record):
    with open(path("metrics.jsonl"), "a") as f:
      f.write(json.dumps(record, default=float) + "\n")
    return write(self, record)

  train_and_evaluate = experiment.train_and_evaluate

  def recording_train_and_evaluate(cfg, workdir, **kwargs):
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": [str(d) for d in jax.devices()],
            "local_devices": [str(d) for d in jax.local_devices()]}
    _check_global_batch(info)
    report = train_and_evaluate(cfg, workdir, **kwargs)
    with open(path("report.json"), "w") as f:
      json.dump({"info": info, "report": report}, f, default=str)
    return report

  checkpoint.Checkpointer.save = recording_save
  metric_writers.MetricWriter.write = recording_write
  experiment.train_and_evaluate = recording_train_and_evaluate
  app.run(main_lib.main, argv=["sovr_jax.main"] + main_argv)


# --------------------------------------------------------------------------------------------
# Launching.
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)  # the process and anything it started
      except (ProcessLookupError, PermissionError):
        p.kill()
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass


def _launch(out_dir: str, workdir: str, extra: list[str], *, processes: int,
            devices_per_process: int) -> list[str]:
  """Runs the worker in ``processes`` processes; returns each one's output (stdout+stderr).
  Kills them all as soon as one fails or the timeout passes."""
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
             TF_CPP_MIN_LOG_LEVEL="2")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  flags = BASE_FLAGS + [f"--workdir={workdir}"] + extra
  if processes > 1:
    port = _free_port()
    flags += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
  procs, logs = [], []
  try:
    for i in range(processes):
      log = open(os.path.join(out_dir, f"launch_{i}.log"), "w")
      logs.append(log)
      cmd = [sys.executable, os.path.abspath(__file__), out_dir, "--"] + flags
      if processes > 1:
        cmd.append(f"--process_id={i}")
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
        break
      time.sleep(0.5)
  finally:
    _kill(procs)
    for log in logs:
      log.close()
  outputs = [open(os.path.join(out_dir, f"launch_{i}.log")).read() for i in range(processes)]
  codes = [p.returncode for p in procs]
  if codes != [0] * processes:
    tails = "\n".join(f"--- process {i} (exit {c}) ---\n{o[-4000:]}"
                      for i, (c, o) in enumerate(zip(codes, outputs)))
    pytest.fail(f"{processes}-process run failed or timed out after {TIMEOUT_S} s "
                f"(exit codes {codes}):\n{tails}")
  return outputs


def _state(out_dir: str, process: int = 0) -> dict[str, np.ndarray]:
  with np.load(os.path.join(out_dir, f"p{process}_state.npz")) as z:
    return dict(z)


def _metrics(out_dir: str, process: int = 0) -> list[dict]:
  with open(os.path.join(out_dir, f"p{process}_metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _report(out_dir: str, process: int = 0) -> dict:
  with open(os.path.join(out_dir, f"p{process}_report.json")) as f:
    return json.load(f)


def _assert_states_close(a, b, *, rtol, atol, what):
  assert sorted(a) == sorted(b), what
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


def _assert_metrics_close(a, b, *, rtol, what):
  timing = ("epoch_time_s", "images_per_s")
  assert [sorted(r) for r in a] == [sorted(r) for r in b], what
  for ra, rb in zip(a, b):
    for k, v in ra.items():
      if k not in timing:
        assert v == pytest.approx(rb[k], rel=rtol, abs=1e-5), f"{what}: {k} {ra} vs {rb}"


def _test_results(report: dict) -> dict:
  r = report["report"]
  return {"test": r["test"], "margins": {k: v for k, v in r["margins"].items()}}


# --------------------------------------------------------------------------------------------
# When sovr_jax.main starts jax.distributed (no processes launched).
# --------------------------------------------------------------------------------------------

_LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.mark.parametrize("env, args, mode, expected", [
    ({}, {}, "auto", None),
    ({}, {"num_processes": 1}, "auto", None),
    ({"JAX_NUM_PROCESSES": "1"}, {}, "auto", None),
    ({"SLURM_NTASKS": "1"}, {}, "auto", None),
    ({}, {}, "on", (None, None, None)),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, {}, "off", None),
    ({}, {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}, "auto",
     ("h0:1234", 2, 1)),
    ({"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}, {},
     "auto", ("h0:99", 4, 3)),
    ({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}, {"process_id": 0}, "auto",
     (None, 4, 0)),                                      # a flag beats the environment
    ({"SLURM_NTASKS": "8"}, {}, "auto", (None, None, None)),  # jax reads SLURM's variables
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, "auto", (None, None, None)),
])
def test_initialize_distributed_decision(monkeypatch, env, args, mode, expected):
  import jax  # pylint: disable=import-outside-toplevel
  from sovr_jax import sharding  # pylint: disable=import-outside-toplevel

  for k in _LAUNCH_ENV:
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: calls.append((kw["coordinator_address"],
                                                 kw["num_processes"], kw["process_id"])))
  started = sharding.initialize_distributed(**args, mode=mode)
  assert started == (expected is not None)
  assert calls == ([] if expected is None else [expected])


def test_initialize_distributed_rejects_a_bad_mode():
  from sovr_jax import sharding  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="auto, on or off"):
    sharding.initialize_distributed(mode="yes")


# --------------------------------------------------------------------------------------------
# The runs (shared by the tests below).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  pytest.importorskip("jax")
  return {"root": str(tmp_path_factory.mktemp("multihost")), "times": {}}


def _run_once(runs, name, fn):
  if name not in runs:
    t0 = time.time()
    runs[name] = fn()
    runs["times"][name] = time.time() - t0
    print(f"{name}: {runs['times'][name]:.1f} s")
  return runs[name]


@pytest.fixture(scope="module")
def two_process(runs):
  """2 processes x 1 device, 1 epoch."""
  def go():
    out = os.path.join(runs["root"], "two_process")
    wd = os.path.join(runs["root"], "wd_two_process")
    logs = _launch(out, wd, [], processes=2, devices_per_process=1)
    # Keep a copy of the 1-epoch workdir for the 2-process resume.
    shutil.copytree(wd, wd + "_copy")
    return {"out": out, "workdir": wd, "logs": logs}
  return _run_once(runs, "two_process", go)


@pytest.fixture(scope="module")
def one_process(runs):
  """1 process x 2 devices, 1 epoch: the same mesh size, the same global batches."""
  def go():
    out = os.path.join(runs["root"], "one_process")
    wd = os.path.join(runs["root"], "wd_one_process")
    logs = _launch(out, wd, [], processes=1, devices_per_process=2)
    return {"out": out, "workdir": wd, "logs": logs}
  return _run_once(runs, "one_process", go)


def test_processes_agree(two_process):
  out, logs = two_process["out"], two_process["logs"]
  r0, r1 = _report(out, 0), _report(out, 1)
  assert (r0["info"]["process_index"], r1["info"]["process_index"]) == (0, 1)
  assert r0["info"]["process_count"] == r1["info"]["process_count"] == 2
  assert len(r0["info"]["devices"]) == 2 and len(r0["info"]["local_devices"]) == 1
  for r in (r0, r1):
    for name in ("default", "reversed"):
      assert r["info"][f"global_batch_{name}"]["ok"], r["info"]
      assert r["info"][f"global_batch_{name}"]["stacked_ok"], r["info"]
  # The same state in both processes (replicas of one computation) ...
  s0, s1 = _state(out, 0), _state(out, 1)
  assert int(s0["['step']"]) == 8
  _assert_states_close(s0, s1, rtol=1e-6, atol=1e-7, what="process 0 vs 1")
  # ... the same metrics (fetched on both, written by process 0) and report.
  _assert_metrics_close(_metrics(out, 0), _metrics(out, 1), rtol=1e-6, what="metrics")
  assert _test_results(r0) == _test_results(r1)
  # Only process 0 talks and writes.
  assert "sovr | small_cnn" in logs[0] and "on 2 processes" in logs[0]
  assert "test (final model" in logs[0]
  for line in ("sovr | small_cnn", "test (final model", "epoch=1", "Report:"):
    assert line not in logs[1], logs[1][-2000:]
  wd = two_process["workdir"]
  for name in ("config.json", "metrics.jsonl", "report.json", "margins.png"):
    assert os.path.exists(os.path.join(wd, name)), name
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert len([r for r in lines if "epoch_time_s" in r]) == 1  # written once, not per process
  assert len(lines) == len(_metrics(out, 0))
  with open(os.path.join(wd, "report.json")) as f:
    on_disk = json.load(f)
  assert on_disk["test"] == r0["report"]["test"]


def test_matches_single_process(two_process, one_process):
  mh, sp = two_process["out"], one_process["out"]
  rs = _report(sp)
  assert rs["info"]["process_count"] == 1 and len(rs["info"]["devices"]) == 2
  _assert_states_close(_state(mh), _state(sp), rtol=1e-4, atol=1e-5,
                       what="2 processes vs 1 process")
  _assert_metrics_close(_metrics(mh), _metrics(sp), rtol=1e-4, what="metrics")
  a, b = _test_results(_report(mh)), _test_results(rs)
  for which in ("final", "best"):
    for k in ("n", "clean_acc", "pgd_acc", "cw_acc"):
      assert a["test"][which][k] == pytest.approx(b["test"][which][k], abs=1.5 / 64), (which, k)
  assert a["margins"]["mean"] == pytest.approx(b["margins"]["mean"], rel=1e-3, abs=1e-3)


@pytest.fixture(scope="module")
def resumed_one_process(runs, two_process):
  """The 2-process workdir continued to 2 epochs in 1 process x 1 device."""
  def go():
    out = os.path.join(runs["root"], "resumed_one_process")
    logs = _launch(out, two_process["workdir"], ["--config.train.epochs=2"], processes=1,
                   devices_per_process=1)
    return {"out": out, "workdir": two_process["workdir"], "logs": logs}
  return _run_once(runs, "resumed_one_process", go)


def test_two_process_checkpoint_resumes_in_one_process(resumed_one_process):
  log = resumed_one_process["logs"][0]
  assert "Resumed from" in log and "at step 8 (epoch 1)" in log, log[-3000:]
  assert int(_state(resumed_one_process["out"])["['step']"]) == 16
  with open(os.path.join(resumed_one_process["workdir"], "metrics.jsonl")) as f:
    epochs = [json.loads(line) for line in f if "epoch_time_s" in line]
  assert [r["epoch"] for r in epochs] == [1, 2] and epochs[-1]["step"] == 16
  with open(os.path.join(resumed_one_process["workdir"], "report.json")) as f:
    assert json.load(f)["test"]["final"]["epoch"] == 2


def test_two_process_resume_matches_one_process_resume(runs, two_process,
                                                       resumed_one_process):
  def go():
    out = os.path.join(runs["root"], "resumed_two_process")
    logs = _launch(out, two_process["workdir"] + "_copy", ["--config.train.epochs=2"],
                   processes=2, devices_per_process=1)
    return {"out": out, "logs": logs}
  resumed = _run_once(runs, "resumed_two_process", go)
  assert "Resumed from" in resumed["logs"][0] and "at step 8" in resumed["logs"][0]
  assert "Resumed from" not in resumed["logs"][1]
  s0, s1 = _state(resumed["out"], 0), _state(resumed["out"], 1)
  assert int(s0["['step']"]) == 16
  _assert_states_close(s0, s1, rtol=1e-6, atol=1e-7, what="resumed: process 0 vs 1")
  # Epoch 2 on 2 processes x 1 device vs on 1 process x 1 device (unsplit batches).
  _assert_states_close(s0, _state(resumed_one_process["out"]), rtol=1e-4, atol=1e-5,
                       what="resumed: 2 processes vs 1 process")
  print("run times:", json.dumps({k: round(v, 1) for k, v in runs["times"].items()}))


if __name__ == "__main__":
  _worker(sys.argv[1:])
