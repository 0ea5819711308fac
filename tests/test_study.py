"""The reproduction study's driver (scripts/study.py), its config and its plots, at tiny scale."""

import json
import os
import subprocess

import numpy as np
import pytest

from configs import study as study_config
from scripts import plot_study, study
from sovr_jax import config_lib

from tests.test_data import CIFAR_TARBALL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_specs():
  specs = study.run_specs("pgd_at,sovr", "0.2,0.6")
  assert specs == {"pgd_at": ("pgd_at", []), "sovr": ("sovr", []),
                   "sovr_rho0.2": ("sovr", ["--config.sovr.ovr_fraction=0.2"]),
                   "sovr_rho0.6": ("sovr", ["--config.sovr.ovr_fraction=0.6"])}
  with pytest.raises(ValueError, match="Unknown method 'sovrr'"):
    study.run_specs("sovrr", "")
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    study.run_specs("", "1.5")
  with pytest.raises(ValueError, match="Nothing to run"):
    study.run_specs("", "")


@pytest.mark.parametrize("scale", study_config.SCALES)
def test_study_configs_validate(scale):
  for method in ("pgd_at", "sovr", "mail_at", "gairat", "trades", "mart"):
    cfg = study_config.get_config(f"{method},{scale}")
    config_lib.validate(cfg)
    assert cfg.method == method and cfg.data.source == "image_folder"
    assert cfg.attack.eps == pytest.approx(8 / 255)
  with pytest.raises(ValueError, match="Unknown study scale 'huge'"):
    study_config.get_config("sovr,huge")


def test_curves_merge_log_lines_and_epoch_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 2, "epoch": 1, "loss": 2.0, "adv_acc": 0.1},
           {"step": 4, "epoch": 1, "loss": 1.0, "adv_acc": 0.3},
           {"step": 4, "epoch": 1, "val_pgd_acc": 0.2, "val_clean_acc": 0.5, "epoch_time_s": 3.0},
           {"step": 6, "epoch": 2, "loss": 0.5, "adv_acc": 0.4}]
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  curves = study._curves(str(path))
  assert [c["epoch"] for c in curves] == [1, 2]
  assert curves[0]["loss"] == pytest.approx(1.5) and curves[0]["adv_acc"] == pytest.approx(0.2)
  assert curves[0]["val_pgd_acc"] == 0.2 and "val_pgd_acc" not in curves[1]


def test_attack_stage_engines_and_collect(tmp_path, monkeypatch):
  """--reference runs go side by side; the others to --aa_engine's AutoAttack, whose JSON
  collect files under that engine."""
  for name in ("pgd_at", "sovr"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text("{}")
  calls = []
  monkeypatch.setattr(study, "_run", lambda cmd, log, timeout: calls.append(cmd) or {"ok": True, "seconds": 0.0})
  args = study._parser().parse_args([f"--workdir={tmp_path}", "--out=x", "--reference=sovr",
                                     "--aa_engine=reference", "--threads=1", "--device=cpu"])
  status = study.attack_stage(study.run_specs("pgd_at,sovr,gairat", ""), args)
  assert set(status) == {"pgd_at", "sovr"}  # gairat is not trained: nothing to attack
  outs = {next(a for a in cmd if a.startswith("--out=")): cmd for cmd in calls}
  pgd = outs[f"--out={tmp_path}/pgd_at/autoattack.json"]
  sovr = outs[f"--out={tmp_path}/sovr/compare.json"]
  assert "--engine=reference" in pgd
  assert any(a.endswith("compare_autoattack.py") for a in sovr)
  assert "--threads=1" in pgd and "--threads=1" in sovr and "--device=cpu" in pgd

  (tmp_path / "pgd_at" / "autoattack.json").write_text(json.dumps(
      {"robust_acc": 0.3, "n": 10, "unrelated": 1}))
  monkeypatch.setattr(study, "_curves", lambda path: [])
  (tmp_path / "pgd_at" / "report.json").write_text(json.dumps(
      {"test": {}, "margins": {"std": 1.0, "histogram": [1]}, "config": {}}))
  runs = study.collect(study.run_specs("pgd_at", ""), args, {})["runs"]
  assert runs["pgd_at"]["autoattack"] == {"reference": {"robust_acc": 0.3, "n": 10}}
  assert runs["pgd_at"]["margins_summary"] == {"std": 1.0}


@pytest.mark.skipif(CIFAR_TARBALL is None, reason="no cifar10-jpeg.tar.gz")
def test_gpu_study_script_at_tiny_scale(tmp_path):
  """scripts/gpu_study.sh end to end on the CPU: train two runs at once, pyautoattack and the
  JAX AutoAttack side by side on one, the JAX AutoAttack on the other, collect, plot."""
  out_dir, work = tmp_path / "out", tmp_path / "runs"
  out_dir.mkdir()
  env = dict(os.environ, OUT=str(out_dir), SCALE="tiny", RUNS="pgd_at", SWEEP="0.5",
             REFERENCE="pgd_at", N="16", ATTACKS="apgd-ce", PARALLEL="2", DEADLINE="900",
             ATTACK_S="300", DATA=str(CIFAR_TARBALL), WORK=str(work),
             CACHE_DIR=str(tmp_path / "cache"), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jc"))
  proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_study.sh")], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = out_dir / "study_tiny.json"
  result = json.loads(out.read_text())
  assert set(result["runs"]) == {"pgd_at", "sovr_rho0.5"}
  assert {"log.txt", "logs.tar.gz", "study_tiny.json"} <= set(os.listdir(out_dir))
  for run in result["runs"].values():
    assert [c["epoch"] for c in run["curves"]] == [1, 2]
    assert run["test"]["final"]["n"] == 64
    assert len(run["margins"]["margins"]) == len(run["margins"]["small_margin"]) == 64
    aa = run["autoattack"]["jax"]
    assert aa["n"] == 16 and list(aa["robust_acc_after"]) == ["apgd-ce"]
    assert aa["robust_acc"] <= aa["clean_acc"]
  assert result["runs"]["sovr_rho0.5"]["ovr_fraction"] == 0.5
  assert result["runs"]["pgd_at"]["ovr_fraction"] is None
  ref = result["runs"]["pgd_at"]["autoattack"]["reference"]
  assert ref["n"] == 16 and "apgd-ce" in ref["robust_acc_after"]

  # Rerunning the driver finds everything done: nothing is retrained or re-attacked.
  again = study.main(["--scale=tiny", f"--workdir={work}", f"--out={tmp_path / 'again.json'}",
                      "--runs=pgd_at", "--sweep=0.5", "--reference=pgd_at", "--n=16",
                      "--attacks=apgd-ce", "--data=/nonexistent"])
  assert all(run["status"] is None for run in again["runs"].values())

  written = plot_study.main(["--study", str(out), "--out", str(tmp_path / "fig")])
  assert {os.path.basename(p) for p in written} == {
      "fig_margins.png", "fig_curves.png", "fig_table.md"}  # one SOVR rho: no sweep plot
  table = (tmp_path / "fig_table.md").read_text()
  assert "SOVR (rho=0.5)" in table and "AutoAttack (reference)" in table


def test_sweep_points_and_table_from_json():
  run = lambda method, rho, pgd, aa: {  # noqa: E731
      "method": method, "ovr_fraction": rho,
      "test": {"best": {"epoch": 3, "clean_acc": 0.8, "pgd_acc": pgd, "cw_acc": pgd - 0.01}},
      "autoattack": {"jax": {"robust_acc": aa, "n": 100,
                             "robust_acc_after": {"apgd-ce": aa}}} if aa else None}
  s = {"study": "s", "scale": "tiny",
       "runs": {"pgd_at": run("pgd_at", None, 0.40, 0.35),
                "sovr": run("sovr", 0.4, 0.42, 0.37),
                "sovr_rho0.8": run("sovr", 0.8, 0.41, None)}}
  assert plot_study.sweep_points(s) == [(0.0, 0.35, 0.40, "jax"), (0.4, 0.37, 0.42, "jax"),
                                        (0.8, None, 0.41, "")]
  table = plot_study.table(s).splitlines()
  assert len(table) == 5 and "AutoAttack (JAX)" in table[0]
  assert "| SOVR | 3 | 80.00 | 42.00 | 41.00 | 37.00 (n=100) |" in table[3]
  assert plot_study.aa_cell({"n": 10, "robust_acc_after": {"apgd-ce": 0.5, "fab-t": 0.4}}) \
      == "40.00 after fab-t (n=10)"
  assert np.isclose(plot_study.sweep_points(s)[1][1], 0.37)
