"""The command line on a real tiny training run (CPU, 16 test points, few attacks)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sovr_jax import autoattack_eval, export
from sovr_jax.errors import ConfigError, InvalidFileError, WorkdirLockedError
from sovr_jax.evaluation import reference, schema
from tests import references

# The reference engine and the export need these; the JAX engine's tests run without them.
needs_reference = references.needs("torch", "pyautoattack")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
FAST = ["--n", "16", "--batch_size", "16", "--device", "cpu", "--threads", "1"]


@needs_reference
def test_both_engines_on_a_run_write_their_results_and_the_comparison(trained_tiny_run,
                                                                       tmp_path, capsys):
  out = str(tmp_path / "cmp.json")
  res = autoattack_eval.run(["--workdir", trained_tiny_run, "--engine", "both", "--attacks",
                             "apgd-ce", "--jax_pgd", "--out", out, *FAST])
  for engine in ("jax", "reference"):
    r = schema.read(str(tmp_path / f"cmp_{engine}.json"))
    assert r == json.loads(json.dumps(res[engine]))
    assert r["n"] == 16 and r["eps"] == pytest.approx(0.1) and r["version"] == "custom"
    assert r["attacks"] == ["apgd-ce"] and r["clean_acc"] > 0
    assert r["robust_acc_after"]["apgd-ce"] == pytest.approx(r["robust_acc"])
    assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
    assert r["model"]["architecture"] == "small_cnn" and r["model"]["step"] > 0
    assert r["upper_bounds"]["clean_acc"] == pytest.approx(r["clean_acc"])
    assert "upper bound" in r["upper_bounds"]["note"]
    assert isinstance(r["checks"]["robust_acc_le_pgd20"], bool)
    assert {"jax", "sovr_jax"} <= set(r["versions"]) and "autoattack_eval" in r["command"]
  ref = res["reference"]
  assert {"torch", "pyautoattack"} <= set(ref["versions"])
  assert ref["checks"]["twin_max_rel_logit_diff"] < 1e-3
  with open(out) as f:
    cmp = json.load(f)
  assert cmp["rows"][0]["attack"] == "clean" and cmp["rows"][0]["diff"] == 0.0
  assert abs(res["jax"]["robust_acc"] - ref["robust_acc"]) <= 2 / 16
  assert not reference.resume_paths(str(tmp_path / "cmp_reference.json"))[1].exists()
  stdout = capsys.readouterr().out
  assert "running apgd-ce" in stdout and "per-point agreement" in stdout


def test_defaults_write_into_the_workdir_and_bf16_attacks(trained_tiny_run):
  res = autoattack_eval.run(["--workdir", trained_tiny_run, "--engine", "jax", "--attacks",
                             "apgd-ce", "--attack_dtype", "bfloat16", "--runs_at_once",
                             "2", *FAST])
  path = os.path.join(trained_tiny_run, "autoattack_jax.json")
  r = schema.read(path)
  assert r["settings"]["attack_dtype"] == "bfloat16" and r["checks"]["broken_misclassified"]
  assert r["settings"]["runs_at_once"] == 2
  assert r["robust_acc"] == res["jax"]["robust_acc"]


def test_bad_arguments_give_clear_errors(trained_tiny_run, tmp_path):
  run = autoattack_eval.run
  with pytest.raises(ConfigError, match="did you mean --eps 8/255"):
    run(["--workdir", trained_tiny_run, "--eps", "8", *FAST])
  with pytest.raises(ConfigError, match="valid attacks: apgd-ce"):
    run(["--workdir", trained_tiny_run, "--attacks", "apgd-xx", *FAST])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run(["--workdir", str(tmp_path / "nope"), *FAST])
  with pytest.raises(FileNotFoundError, match="No model.json .* Export a training run first"):
    run(["--export", str(tmp_path), *FAST])
  torn = tmp_path / "torn"
  torn.mkdir()
  (torn / "model.json").write_text('{"format": "sovr_jax.export/')  # cut short by a crash
  with pytest.raises(InvalidFileError, match="model.json is not valid JSON"):
    run(["--export", str(torn), *FAST])
  with pytest.raises(ConfigError, match="Give --workdir"):
    run(FAST)
  with pytest.raises(ConfigError, match="needs the JAX model"):
    run(["--export", str(tmp_path), "--engine", "jax", *FAST])
  with pytest.raises(ConfigError, match="--attack_dtype applies"):
    run(["--workdir", trained_tiny_run, "--attack_dtype", "bfloat16", *FAST])
  with pytest.raises(ConfigError, match="--runs_at_once applies"):
    run(["--workdir", trained_tiny_run, "--runs_at_once", "9", *FAST])
  with pytest.raises(ConfigError, match="--runs_at_once must be >= 1"):
    run(["--workdir", trained_tiny_run, "--engine", "jax", "--runs_at_once", "0", *FAST])
  with pytest.raises(ConfigError, match="--model needs --out"):
    run(["--model", "tiny_mlp", *FAST])


@needs_reference
def test_command_line_on_an_export_and_its_errors(trained_tiny_run, tmp_path):
  export_dir = os.path.join(trained_tiny_run, "export")
  if not os.path.exists(os.path.join(export_dir, "model.json")):
    export.export_workdir(trained_tiny_run, export_dir)
  out = tmp_path / "cli.json"
  cmd = [sys.executable, "-m", "sovr_jax.autoattack_eval", "--export", export_dir]
  proc = subprocess.run(cmd + ["--attacks", "apgd-ce", "--n", "8", "--batch_size", "8",
                               "--device", "cpu", "--out", str(out)],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = schema.read(str(out))
  assert r["n"] == 8 and r["robust_acc"] <= r["clean_acc"] and r["model"]["export"]
  proc = subprocess.run(cmd + ["--eps", "8", "--out", str(out)], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "8/255" in proc.stderr and "Traceback" not in proc.stderr


@needs_reference
def test_sigkilled_reference_run_resumes(trained_tiny_run, tmp_path):
  """SIGKILL the reference engine once its first attack is recorded; the same command
  resumes from there and finishes."""
  out = str(tmp_path / "killed.json")
  cmd = [sys.executable, "-m", "sovr_jax.autoattack_eval", "--workdir", trained_tiny_run,
         "--attacks", "apgd-ce,apgd-t", "--eps", "2/255", "--out", out,
         "--n", "32", "--batch_size", "16", "--device", "cpu", "--threads", "1"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  _, progress = reference.resume_paths(out)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    try:
      with open(progress) as f:
        if json.load(f).get("current") == "apgd-t":
          break
    except (FileNotFoundError, ValueError):
      pass
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(out)
  again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming" in again.stdout
  r = schema.read(out)
  assert r["checks"]["resumed"] and r["checks"]["sessions"] == 2
  assert [e["attack"] for e in r["per_attack"]] == ["apgd-ce", "apgd-t"]
  assert r["per_attack"][0]["session"] == 1 and r["per_attack"][1]["session"] == 2
  assert not progress.exists()


def test_a_second_evaluation_keeps_the_first_result(tmp_path, capsys):
  """Two evaluations writing to one file (another checkpoint, another --n, two exports beside
  each other): the finished first result is kept, renamed, never replaced."""
  out = tmp_path / "aa.json"
  common = ["--model", "tiny_mlp", "--engine", "jax", "--attacks", "apgd-ce", "--fast",
            "--batch_size", "16", "--out", str(out)]
  first = autoattack_eval.run(common + ["--n", "16"])["jax"]
  second = autoattack_eval.run(common + ["--n", "24"])["jax"]
  kept = sorted(tmp_path.glob("aa.earlier-*.json"))
  assert len(kept) == 1 and "kept it as" in capsys.readouterr().out
  assert schema.read(str(kept[0]))["points"] == first["points"]
  assert schema.read(str(out))["n"] == second["n"] == 24


def test_a_second_evaluation_of_the_same_file_at_once_is_refused(tmp_path):
  """Two evaluations writing one result at the same time: the second is refused with the
  first's pid (before, a reference run took the first's resume state for an interrupted
  run's and offered --fresh, which would delete it)."""
  out = tmp_path / "aa.json"
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, %r)\n"
      "from sovr_jax import rundir\n"
      "rundir.WorkdirLock(%r, '.aa.json.lock', 'x').acquire(); print('locked', flush=True)\n"
      "time.sleep(600)") % (REPO, str(tmp_path))], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}.*another --out"):
      autoattack_eval.run(["--model", "tiny_mlp", "--engine", "jax", "--attacks", "apgd-ce",
                           "--fast", "--n", "16", "--batch_size", "16", "--out", str(out)])
    assert not out.exists()
  finally:
    holder.kill()
    holder.wait()
