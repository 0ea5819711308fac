"""sovr_jax.autoattack_eval on a real tiny training run (CPU, 16 test points, APGD-CE only)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sovr_jax import autoattack_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)  # shared cores: oversubscribed OpenMP threads slow torch ~100x
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
FAST = ["--n", "16", "--batch_size", "16", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(trained_tiny_run):
  return trained_tiny_run


def test_apgd_ce_on_a_tiny_run_writes_the_results(tiny_run, tmp_path, capsys):
  out = tmp_path / "aa.json"
  res = autoattack_eval.run(["--workdir", tiny_run, "--attacks", "apgd-ce", "--jax_pgd",
                             "--out", str(out), *FAST])
  with open(out) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(res))
  for key in ("clean_acc", "robust_acc", "robust_acc_after", "time_s", "n", "eps", "seed",
              "batch_size", "device", "version", "attacks", "versions", "export", "command",
              "jax_clean_acc", "jax_pgd20_acc", "jax_cw20_acc", "jax_note", "checks"):
    assert key in written, key
  assert written["n"] == 16 and written["eps"] == pytest.approx(0.1)
  assert written["version"] == "custom" and written["attacks"] == ["apgd-ce"]
  assert list(written["robust_acc_after"]) == ["apgd-ce"]
  assert written["robust_acc_after"]["apgd-ce"] == pytest.approx(written["robust_acc"])
  assert written["time_s"]["apgd-ce"] >= 0
  assert 0 <= written["robust_acc"] <= written["clean_acc"] <= 1
  assert written["clean_acc"] > 0  # the tiny model is a classifier; the attack had work to do
  assert written["clean_acc"] == pytest.approx(written["jax_clean_acc"])
  assert set(written["versions"]) >= {"torch", "pyautoattack", "sovr_jax"}
  assert "UPPER BOUNDS" in written["jax_note"]
  checks = written["checks"]
  assert checks["within_eps"] and checks["in_unit_range"] and checks["finite"]
  assert checks["max_perturbation"] <= 0.1 + 1e-6
  assert checks["flags_disagree"] == 0 and not written["resumed"]
  assert isinstance(checks["robust_acc_le_jax_pgd20"], bool)
  assert written["export"] == os.path.join(tiny_run, "export", "model.json")
  assert not (tmp_path / "aa_state.json").exists()  # finished runs leave no state behind
  stdout = capsys.readouterr().out
  assert "autoattack: running apgd-ce" in stdout and "robust accuracy after APGD-CE" in stdout


def test_interrupted_run_resumes_from_the_state_file(tiny_run, tmp_path, monkeypatch):
  from pyautoattack import autopgd_base  # pylint: disable=import-outside-toplevel

  def crash(*args, **kwargs):
    raise RuntimeError("simulated crash in apgd-t")

  out = tmp_path / "aa.json"
  argv = ["--workdir", tiny_run, "--attacks", "apgd-ce,apgd-t", "--eps", "2/255",
          "--out", str(out), *FAST]
  with monkeypatch.context() as m:
    m.setattr(autopgd_base.APGDAttack_targeted, "perturb", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
      autoattack_eval.run(argv)
  # pyautoattack's state (robust flags after every batch; its run-attack list may lag by 60 s)
  # and our record of the finished attacks.
  state = autoattack_eval.read_state(tmp_path / "aa_state.json")
  assert state["attacks_to_run"] == {"apgd-ce", "apgd-t"}
  assert state["robust_flags"].any(), "eps 2/255 should leave robust points for apgd-t"
  with open(tmp_path / "aa_progress.json") as f:
    assert list(json.load(f)["attacks"]) == ["apgd-ce"]
  assert not out.exists()

  with pytest.raises(ValueError, match="other settings \\(eps\\).*--fresh"):
    autoattack_eval.run([a if a != "2/255" else "3/255" for a in argv])

  res = autoattack_eval.run(argv)
  assert res["resumed"] and list(res["robust_acc_after"]) == ["apgd-ce", "apgd-t"]
  assert res["robust_acc_after"]["apgd-ce"] == pytest.approx(state["robust_flags"].mean())
  assert res["robust_acc"] == pytest.approx(res["robust_acc_after"]["apgd-t"])
  assert res["robust_acc"] <= res["robust_acc_after"]["apgd-ce"] <= res["clean_acc"]
  assert res["checks"]["flags_disagree"] == 0
  assert not (tmp_path / "aa_state.json").exists()


def test_bad_arguments_give_clear_errors(tiny_run, tmp_path):
  with pytest.raises(ValueError, match="did you mean --eps 8/255"):
    autoattack_eval.run(["--workdir", tiny_run, "--eps", "8", *FAST])
  with pytest.raises(ValueError, match="valid attacks: apgd-ce"):
    autoattack_eval.run(["--workdir", tiny_run, "--attacks", "apgd-xx", *FAST])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    autoattack_eval.run(["--workdir", str(tmp_path / "nope"), *FAST])
  with pytest.raises(FileNotFoundError, match="No exported model"):
    autoattack_eval.run(["--export", str(tmp_path), *FAST])
  with pytest.raises(ValueError, match="Give --workdir"):
    autoattack_eval.run(FAST)
  assert autoattack_eval.parse_eps("8/255") == pytest.approx(8 / 255)
  with pytest.raises(ValueError, match="8/255"):
    autoattack_eval.parse_eps("eight")


def test_command_line_on_an_export(tiny_run, tmp_path):
  export_dir = os.path.join(tiny_run, "export")
  if not os.path.exists(os.path.join(export_dir, "model.json")):
    from sovr_jax import export  # pylint: disable=import-outside-toplevel
    export.export_workdir(tiny_run, export_dir)
  out = tmp_path / "cli.json"
  proc = subprocess.run(
      [sys.executable, "-m", "sovr_jax.autoattack_eval", "--export", export_dir, "--attacks",
       "apgd-ce", "--n", "8", "--batch_size", "8", "--device", "cpu", "--out", str(out)],
      cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "robust accuracy" in proc.stdout
  with open(out) as f:
    res = json.load(f)
  assert res["n"] == 8 and res["robust_acc"] <= res["clean_acc"]
  proc = subprocess.run(
      [sys.executable, "-m", "sovr_jax.autoattack_eval", "--export", export_dir, "--eps", "8",
       "--out", str(out)], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2 and "8/255" in proc.stderr


def test_jax_engine_matches_the_reference_shape_and_numbers(tiny_run, tmp_path):
  """--engine jax: sovr_jax's AutoAttack on the JAX model, same JSON shape; on the same
  points its APGD-CE robust accuracy is close to the reference's."""
  ref = autoattack_eval.run(["--workdir", tiny_run, "--attacks", "apgd-ce",
                             "--out", str(tmp_path / "ref.json"), *FAST])
  jx = autoattack_eval.run(["--workdir", tiny_run, "--engine", "jax", "--attacks", "apgd-ce",
                            "--out", str(tmp_path / "jax.json"), *FAST])
  for key in ("clean_acc", "robust_acc", "robust_acc_after", "time_s", "n", "eps", "seed"):
    assert key in jx, key
  assert jx["engine"] == "jax" and jx["n"] == ref["n"] == 16
  assert jx["clean_acc"] == pytest.approx(ref["clean_acc"])
  assert abs(jx["robust_acc"] - ref["robust_acc"]) <= 2 / 16
  assert jx["checks"]["within_eps"] and jx["checks"]["in_unit_range"]
  with pytest.raises(ValueError, match="--workdir"):
    autoattack_eval.run(["--export", str(tmp_path), "--engine", "jax", *FAST])
  # Attacks on the bfloat16 network, decisions on the float32 one.
  bf = autoattack_eval.run(["--workdir", tiny_run, "--engine", "jax", "--attacks", "apgd-ce",
                            "--attack_dtype", "bfloat16", "--out", str(tmp_path / "bf.json"),
                            *FAST])
  assert bf["attack_dtype"] == "bfloat16" and bf["settings"]["separate_attack_model"]
  assert bf["clean_acc"] == jx["clean_acc"] and abs(bf["robust_acc"] - jx["robust_acc"]) <= 2 / 16
  assert bf["checks"]["broken_misclassified"]
  with pytest.raises(ValueError, match="--attack_dtype applies to --engine jax"):
    autoattack_eval.run(["--workdir", tiny_run, "--attack_dtype", "bfloat16", *FAST])
