"""The reproduction study's driver (sovr_jax/study.py), its config, its GPU script and its
tables, at tiny scale."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from configs import study as study_config
from sovr_jax import config_lib, rundir, stats, study, study_report
from sovr_jax.evaluation import schema
from tests import references

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _small_cifar_tarball(path, per_class=(("train", 33), ("test", 7))):
  """A .tar.gz laid out as ../shared/data/cifar10-jpeg.tar.gz (train|test/<class>/NNNN.jpg,
  CIFAR-10's classes), with random 32x32 JPEGs: enough for the tiny scale (256 train + 64
  validation, 64 test) and decoded in a second, where the real 60,000 take tens of seconds."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  with tarfile.open(path, "w:gz") as tar:
    for split, n in per_class:
      for cls in CIFAR10_CLASSES:
        for i in range(n):
          buf = io.BytesIO()
          Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
          info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
          info.size = buf.tell()
          buf.seek(0)
          tar.addfile(info, buf)
  return str(path)


def test_cells_and_runs():
  c = study.cells("pgd_at,sovr_ovr_mean", "0,1", "0.2")
  assert list(c) == ["pgd_at_s0", "pgd_at_s1", "sovr_ovr_mean_s0", "sovr_ovr_mean_s1",
                     "sovr_rho0.2_s0", "sovr_rho0.2_s1"]
  assert c["pgd_at_s1"] == ("pgd_at", ["--config.seed=1"], 1)
  assert c["sovr_ovr_mean_s0"][1] == ["--config.sovr.ovr_reduce=mean", "--config.seed=0"]
  assert c["sovr_rho0.2_s0"][1][0] == "--config.sovr.ovr_fraction=0.2"
  with pytest.raises(ValueError, match="Unknown run 'sovrr'"):
    study.cells("sovrr", "0")
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    study.cells("", "0", "1.5")
  with pytest.raises(ValueError, match="Nothing to run"):
    study.cells("", "0")


@pytest.mark.parametrize("scale", study_config.SCALES)
def test_study_configs_validate(scale):
  for method in ("pgd_at", "sovr", "mail_at", "gairat", "trades", "mart"):
    cfg = study_config.get_config(f"{method},{scale}")
    config_lib.validate(cfg)
    assert cfg.method == method and cfg.data.source == "image_folder"
    assert cfg.attack.eps == pytest.approx(8 / 255)


def test_full_scale_is_the_compressed_recipe_and_lengthens_with_its_shape():
  cfg = study_config.get_config("pgd_at")
  assert (cfg.train.epochs, tuple(cfg.train.lr_boundaries)) == (36, (27, 32))
  assert cfg.model.width == 1.0 and cfg.data.num_train == 0 and cfg.precision == "bfloat16"
  # Linear lr scaling: the recipe's lr per example (0.1 at batch 128), hence its lr and weight
  # decay per epoch; the first GPU study's 8-epoch scale keeps the lr it ran at.
  assert cfg.train.batch_size == 512 and cfg.train.lr == pytest.approx(0.1 * 512 / 128)
  assert study_config.get_config("pgd_at,gpu").train.lr == 0.2
  long = study_config.get_config("pgd_at,full,60")
  assert (long.train.epochs, tuple(long.train.lr_boundaries)) == (60, (45, 54))
  with pytest.raises(ValueError, match="Unknown study scale 'huge'"):
    study_config.get_config("sovr,huge")
  with pytest.raises(ValueError, match="full scale only"):
    study_config.get_config("sovr,cpu,60")


def test_the_config_file_and_scale_are_checked_before_anything_runs(tmp_path):
  args = [f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'o.json'}"]
  with pytest.raises(FileNotFoundError, match="no config file"):
    study.main(["--config=/nonexistent/study.py", *args])
  with pytest.raises(ValueError, match="Unknown study scale 'huge'"):
    study.main([f"--config={REPO}/configs/study.py", "--scale=huge", *args])
  assert not (tmp_path / "w").exists()


def test_curves_merge_log_lines_and_epoch_lines(tmp_path):
  lines = [{"step": 2, "epoch": 1, "loss": 2.0, "adv_acc": 0.1},
           {"step": 4, "epoch": 1, "loss": 1.0, "adv_acc": 0.3},
           {"step": 4, "epoch": 1, "val_pgd_acc": 0.2, "val_clean_acc": 0.5, "epoch_time_s": 3.0},
           {"step": 6, "epoch": 2, "loss": 0.5, "adv_acc": 0.4}]
  (tmp_path / "metrics.jsonl").write_text(
      "\n".join(json.dumps(line) for line in lines) + '\n{"step": 7, "ep')  # a torn last line
  curves = study.curves(str(tmp_path))
  assert [c["epoch"] for c in curves] == [1, 2]
  assert curves[0]["loss"] == pytest.approx(1.5) and curves[0]["adv_acc"] == pytest.approx(0.2)
  assert curves[0]["val_pgd_acc"] == 0.2 and "val_pgd_acc" not in curves[1]


def test_attack_stage_commands(tmp_path, monkeypatch, capsys):
  """The JAX engine on --n points for every trained cell; both engines on --check_n for the
  --check cells."""
  for name in ("pgd_at_s0", "sovr_s0"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text("{}")
  calls = []
  monkeypatch.setattr(study, "_run", lambda cmd, log, timeout: calls.append(cmd) or {
      "ok": True, "seconds": 0.0})
  args = study._parser().parse_args([f"--workdir={tmp_path}", "--out=x", "--check=sovr_s0",
                                     "--threads=1", "--device=cpu", "--n=10000",
                                     "--runs_at_once=9", "--attack_dtype=bfloat16"])
  status = study.attack_stage(study.cells("pgd_at,sovr,gairat", "0"), args)
  assert set(status) == {"pgd_at_s0", "sovr_s0"}  # gairat is not trained: nothing to attack
  assert "gairat_s0: not trained" in capsys.readouterr().out
  cell = study.collect_cell("gairat_s0", study.cells("gairat", "0")["gairat_s0"], args, status)
  assert "test" not in cell and "training did not finish" in cell["not_trained"]
  arg = lambda cmd, flag: next(a for a in cmd if a.startswith(flag)).split("=", 1)[1]  # noqa
  engines = sorted((arg(c, "--engine="), arg(c, "--n="), os.path.basename(arg(c, "--workdir=")))
                   for c in calls)
  assert engines == [("both", "1000", "sovr_s0"), ("jax", "10000", "pgd_at_s0"),
                     ("jax", "10000", "sovr_s0")]
  # The check runs the JAX engine as the cell's own AutoAttack did.
  assert all("--runs_at_once=9" in c and "--attack_dtype=bfloat16" in c for c in calls)
  both = next(c for c in calls if "--engine=both" in c)
  assert "--threads=1" in both and "--device=cpu" in both


def _cut_result(broken_by, finished):
  """A JAX result cut after the attacks in ``finished``: ``broken_by`` per point, the attack
  that would break it ("" for none; the attacks that did not run break nothing)."""
  n = len(broken_by)
  clean = np.ones(n, bool)
  broken_by = [b if b in finished else "" for b in broken_by]
  broken = np.array([b != "" for b in broken_by])
  attacks = ("apgd-ce", "apgd-t", "fab-t", "square")
  entries, left = [], clean.copy()
  for a in finished:
    left &= np.array([b != a for b in broken_by])
    entries.append(schema.attack_entry(a, robust_acc=left.mean(), attacked=n, broken=0,
                                       time_s=1.0))
  return schema.build("jax", version="standard", attacks=attacks, clean=clean,
                      robust=clean & ~broken, broken_by=list(broken_by), per_attack=entries,
                      eps=8 / 255, norm="linf", seed=0, batch_size=n, settings={}, checks={},
                      model={}, dataset="cifar10", complete=False)


def test_a_cut_autoattack_keeps_the_cell_as_an_upper_bound(tmp_path):
  """scripts/gpu_study.sh lets training run first and gives the AutoAttack what is left, so a
  cell's AutoAttack may be cut by the driver's --aa_timeout: the child is killed, the cell
  keeps its test figures and the attacks that finished, read as an upper bound, never as the
  cell's AutoAttack figure, and a rerun redoes the attack."""
  name = "pgd_at_s0"
  wd = tmp_path / name
  wd.mkdir()
  best = {"epoch": 36, "clean_acc": 0.81, "pgd_acc": 0.5, "cw_acc": 0.49}
  (wd / "report.json").write_text(json.dumps(
      {"test": {"best": best}, "margins": {"mean": 0.1}, "config": {}}))
  aa_path = str(wd / rundir.AUTOATTACK_FILES["jax"])  # as the JAX engine leaves it after APGD-CE
  schema.write(aa_path, _cut_result(["", "apgd-ce"] * 20, ("apgd-ce",)))
  t0 = time.time()  # a real cut: the driver's own timeout kills its child
  r = study._run([sys.executable, "-c", "import time; time.sleep(60)"],
                 str(tmp_path / f"{name}.log"), timeout=1.0)
  assert time.time() - t0 < 30 and not r["ok"] and "timed out after 1 s" in r["error"]
  args = study._parser().parse_args([f"--workdir={tmp_path}", "--out=x"])
  cell = study.collect_cell(name, study.cells("pgd_at", "0")[name], args, {name: [r]})
  assert cell["test"]["best"] == best and cell["autoattack"][0]["complete"] is False
  assert study_report.figure(cell) is None  # not the cell's AutoAttack figure
  row = study_report.cell_table({"cells": {name: cell}}).splitlines()[-1]
  assert "| 81.00 |" in row and "| - | <= 50.00 (APGD-CE, JAX, n=40) |" in row
  met, said = study_report.gate({"cells": {name: cell}})  # 50 % is only an upper bound
  assert met is None and "met provisionally (seed 0: 81.00 % clean, <= 50.00 % AutoAttack " \
      "(APGD-CE only, n=40))" in said
  assert not study._finished(aa_path)  # a rerun attacks again


def _fake_result(robust, engine="jax", n=None):
  robust = np.asarray(robust, bool)
  n = len(robust)
  return schema.build(engine, version="standard", attacks=("apgd-ce", "apgd-t", "fab-t",
                                                           "square"),
                      clean=np.ones(n, bool), robust=robust,
                      broken_by=["" if r else "apgd-ce" for r in robust],
                      per_attack=[schema.attack_entry("apgd-ce", robust_acc=robust.mean(),
                                                      attacked=n, broken=int((~robust).sum()),
                                                      time_s=1.0)]
                      + [schema.attack_entry(a, robust_acc=robust.mean(), attacked=0, broken=0,
                                             time_s=0.0) for a in ("apgd-t", "fab-t", "square")],
                      eps=8 / 255, norm="linf", seed=0, batch_size=n, settings={}, checks={},
                      model={}, dataset="cifar10")


def _fake_study():
  rng = np.random.default_rng(0)
  cells = {}
  for seed in (0, 1, 2):
    base = rng.random(2000) < 0.45
    better = base | (rng.random(2000) < 0.03)
    for run, flags in (("pgd_at", base), ("sovr", better)):
      cells[f"{run}_s{seed}"] = {
          "run": run, "method": run, "seed": seed, "ovr_fraction": 0.4 if run == "sovr" else None,
          "test": {"best": {"epoch": 30, "clean_acc": 0.8, "pgd_acc": 0.5, "cw_acc": 0.48}},
          "autoattack": [{"role": "main", **_fake_result(flags)}]}
  return {"study": "s", "scale": "full", "cells": cells}


def test_tables_mean_std_and_the_paired_difference():
  s = _fake_study()
  runs = study_report.run_table(s)
  assert "| SOVR | 0,1,2 | 80.00 +- 0.00 |" in runs
  rows = study_report.paired(s, n_boot=500)
  assert [r["seeds"] for r in rows] == [[0], [1], [2], [0, 1, 2]]
  pooled = rows[-1]
  assert pooled["test"]["a_only"] == 0 and pooled["test"]["b_only"] > 0
  assert 0 < pooled["low"] < pooled["diff"] < pooled["high"] and pooled["test"]["p_value"] < 1e-6
  assert rows[0]["test"]["p_value"] == pytest.approx(stats.mcnemar(  # one seed: McNemar's test
      *(schema.decode_points(study_report.figure(s["cells"][f"{r}_s0"]))["robust"]
        for r in ("pgd_at", "sovr")))["p_value"], rel=1e-9)  # two computations: rounding apart
  table = study_report.tables(s)
  assert "| pooled | 0,1,2 | 2000 |" in table and "p (McNemar; pooled" in table
  assert "SOVR - PGD-AT under AutoAttack, seeds 0,1,2" in table and "SOVR above PGD-AT" in table


def test_the_mean_over_seeds_says_when_its_seeds_rest_on_other_results():
  s = _fake_study()
  assert "mixed" not in study_report.run_table(s)
  main = s["cells"]["sovr_s1"]["autoattack"][0]
  s["cells"]["sovr_s1"]["autoattack"] = [  # seed 1's AutoAttack: only the reference check
      {**main, "role": "check", "engine": "reference", "n": 1000,
       "points": {k: v[:1000] for k, v in main["points"].items()}}]
  row = [ln for ln in study_report.run_table(s).splitlines() if ln.startswith("| SOVR |")][0]
  assert ("(mixed: seed 0 n=2000 JAX, seed 1 n=1000 reference, seed 2 n=2000 JAX)" in row), row


def test_cells_on_other_points_or_another_eps_are_not_paired():
  """A seed whose two cells were attacked on other points (another data source or test
  order: another points_sha256) or at another eps has no paired row, and is left out of the
  pooled one."""
  s = _fake_study()
  for run in ("pgd_at", "sovr"):
    for seed in (0, 1, 2):
      s["cells"][f"{run}_s{seed}"]["autoattack"][0]["points_sha256"] = f"{seed:064x}"
  s["cells"]["sovr_s1"]["autoattack"][0]["points_sha256"] = "f" * 64
  s["cells"]["sovr_s2"]["autoattack"][0]["eps"] = 4 / 255
  rows = study_report.paired(s, n_boot=200)
  assert [r["seeds"] for r in rows] == [[0]]


def test_only_seeds_on_the_same_points_are_pooled():
  """Pooling treats point i as the same image in every seed: seeds attacked on other points
  (another points_sha256) or at another eps are each compared alone, and pooled only with the
  seeds on their own points; with no two such seeds the verdict says so, seed by seed."""
  s = _fake_study()
  for cell in s["cells"].values():
    cell["autoattack"][0]["points_sha256"] = "a" * 64
  for run in ("pgd_at", "sovr"):
    s["cells"][f"{run}_s1"]["autoattack"][0]["points_sha256"] = "b" * 64
  rows = study_report.paired(s, n_boot=200)
  assert [r["seeds"] for r in rows] == [[0], [1], [2], [0, 2]]
  for run in ("pgd_at", "sovr"):
    s["cells"][f"{run}_s2"]["autoattack"][0]["eps"] = 4 / 255
  rows = study_report.paired(s, n_boot=200)
  assert [r["seeds"] for r in rows] == [[0], [1], [2]]
  said = study_report.verdict(s, rows=rows)
  assert "the seeds cannot be pooled" in said and "not shown" in said
  assert all(f"seed {k} (n=2000, AutoAttack): +" in said for k in (0, 1, 2)), said


def test_sanity_gate_and_the_plain_verdict():
  """No claim about the paper from models below the gate; an interval containing 0 is "not
  shown at this budget"."""
  s = _fake_study()
  aa = {seed: study_report.figure(s["cells"][f"pgd_at_s{seed}"])["robust_acc"]
        for seed in (0, 1, 2)}
  assert min(aa.values()) >= 0.44  # the fake study's PGD-AT: 80 % clean, ~45 % AutoAttack
  met, said = study_report.gate(s)
  assert met and "met (seed 0: 80.00 % clean" in said
  s["cells"]["pgd_at_s1"]["test"]["best"]["clean_acc"] = 0.63  # one seed below: not met
  met, said = study_report.gate(s)
  assert met is False and "**not met**" in said and "Lengthen the schedule" in said
  assert said in study_report.tables(s)
  del s["cells"]["pgd_at_s0"]["autoattack"], s["cells"]["pgd_at_s1"]["autoattack"]
  del s["cells"]["pgd_at_s2"]["autoattack"]
  assert study_report.gate(s)[0] is None and "not checkable yet" in study_report.gate(s)[1]
  # The same flags for both runs: no difference, said plainly.
  s = _fake_study()
  for seed in (0, 1, 2):
    s["cells"][f"sovr_s{seed}"]["autoattack"] = s["cells"][f"pgd_at_s{seed}"]["autoattack"]
  assert "not shown at this budget" in study_report.verdict(s)
  assert study_report.figure(s["cells"]["sovr_s0"])["engine"] == "jax"


def test_the_gate_is_unchecked_while_a_seed_has_no_autoattack_or_did_not_train():
  s = _fake_study()
  s["cells"]["pgd_at_s1"]["autoattack"] = []
  del s["cells"]["pgd_at_s2"]["test"]
  met, said = study_report.gate(s)
  assert met is None and "met on the seeds checked (seed 0:" in said
  assert "seed 1 has no AutoAttack result" in said and "seed 2 did not train" in said
  s["cells"]["pgd_at_s0"]["test"]["best"]["clean_acc"] = 0.5  # a failing seed decides
  assert study_report.gate(s)[0] is False


def _shifted_study(points_per_seed, n=10000):
  """PGD-AT ~45 % robust; SOVR the same flags moved by the given numbers of points (positive:
  PGD-AT's broken points SOVR holds; negative: the reverse), one seed each."""
  rng = np.random.default_rng(7)
  cells = {}
  for seed, k in enumerate(points_per_seed):
    base = rng.random(n) < 0.45
    moved = base.copy()
    pool = np.flatnonzero(~base if k > 0 else base)
    moved[rng.choice(pool, abs(k), replace=False)] = k > 0
    for run, flags in (("pgd_at", base), ("sovr", moved)):
      cells[f"{run}_s{seed}"] = {
          "run": run, "method": run, "seed": seed, "test": {"best": {
              "epoch": 30, "clean_acc": 0.8, "pgd_acc": 0.5, "cw_acc": 0.48}},
          "autoattack": [{"role": "main", **_fake_result(flags)}]}
  return {"study": "s", "scale": "full", "cells": cells}


def test_the_verdict_weighs_the_seeds_not_only_the_pooled_test_points():
  """The pooled bootstrap resamples test points of these trained models; it leaves out how
  much training itself varies. Seeds that disagree (one significantly the other way) show no
  difference; seeds that agree but spread widely show one for these models only."""
  disagree = _shifted_study([177, -113, 107])
  rows = study_report.paired(disagree, n_boot=500)
  pooled = rows[-1]
  assert pooled["low"] > 0 and rows[1]["high"] < 0  # the pooled interval alone would claim it
  said = study_report.verdict(disagree, rows=rows)
  assert "the seeds disagree (seed 1: the other way" in said and "not shown" in said
  spread = _shifted_study([200, 30, 50])
  rows = study_report.paired(spread, n_boot=500)
  over = rows[-1]["over_seeds"]
  assert over["seeds"] == 3 and over["low"] < 0 < over["high"]
  assert over["mean"] == pytest.approx(np.mean([0.02, 0.003, 0.005]))
  said = study_report.verdict(spread, rows=rows)
  assert "SOVR above PGD-AT on these models" in said
  assert "for the method beyond these models, not shown at this budget" in said
  table = study_report.paired_table(spread, rows=rows)
  assert "mean +- sample std of the per-seed differences, 95 % t interval" in table
  assert "summed over seeds" in table


def test_seed_interval_and_p_formatting():
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  d = [0.0177, -0.0113, 0.0107]
  got = stats.seed_interval(d)
  lo, hi = sps.t.interval(0.95, 2, loc=np.mean(d), scale=sps.sem(d))
  assert got["low"] == pytest.approx(lo) and got["high"] == pytest.approx(hi)
  assert got["std"] == pytest.approx(np.std(d, ddof=1)) and stats.seed_interval([0.01]) is None
  assert stats.format_p(0.0) == "< 1e-300" and stats.format_p(0.012345) == "0.0123"
  assert stats.format_p(1e-320) == "< 1e-300"  # a subnormal float
  flags = np.r_[np.ones(3000, bool), np.zeros(7000, bool)]
  assert stats.format_p(stats.mcnemar(flags, np.zeros(10000, bool))["p_value"]) == "< 1e-300"


def test_a_cut_autoattack_is_compared_on_the_attacks_both_finished():
  """When a session's time cuts the AutoAttack, the paired difference compares the attacks
  both cells finished, on the same points, labelled an upper bound and provisional; the
  pooled row takes the attacks every seed finished; the gate reads the bound one way only."""
  s = _fake_study()
  rng = np.random.default_rng(1)
  n = 2000
  by = {}
  for run in ("pgd_at", "sovr"):
    u = rng.random(n)
    by[run] = np.where(u < 0.45, "apgd-ce", np.where(u < 0.5, "apgd-t", "")).astype(object)
  by["sovr"][:300] = ""  # SOVR holds the first 300 points under both attacks
  s["cells"]["pgd_at_s0"]["autoattack"] = [
      {"role": "main", **_cut_result(by["pgd_at"], ("apgd-ce", "apgd-t"))}]
  s["cells"]["sovr_s0"]["autoattack"] = [
      {"role": "main", **_cut_result(by["sovr"], ("apgd-ce",))}]
  rows = study_report.paired(s, n_boot=200)
  assert [(r["seeds"], r["attacks"], r["complete"]) for r in rows] == [
      ([0], ["apgd-ce"], False), ([1], list(rows[1]["attacks"]), True),
      ([2], list(rows[2]["attacks"]), True), ([0, 1, 2], ["apgd-ce"], False)]
  # Seed 0 at APGD-CE alone: PGD-AT's APGD-T breaks are robust points at that stage.
  robust_ce = {run: by[run] != "apgd-ce" for run in by}
  assert rows[0]["diff"] == pytest.approx(robust_ce["sovr"].mean() - robust_ce["pgd_at"].mean())
  assert rows[0]["test"]["b_only"] == int((robust_ce["sovr"] & ~robust_ce["pgd_at"]).sum())
  # Flags after APGD-CE + APGD-T from the record agree with the flags the cut run stored.
  cut = s["cells"]["pgd_at_s0"]["autoattack"][0]
  assert np.array_equal(study_report.flags_after(cut, ["apgd-ce", "apgd-t"]), by["pgd_at"] == "")
  with pytest.raises(ValueError, match="not the first attacks"):
    study_report.flags_after(cut, ["apgd-t"])
  table = study_report.tables(s)
  assert "| APGD-CE only (upper bounds of AutoAttack) |" in table
  assert "SOVR - PGD-AT under APGD-CE only (upper bounds of AutoAttack), seeds 0,1,2" in table
  assert "Provisional" in study_report.verdict(s)
  # The gate: seed 0's bound passes only provisionally; one below 44 % fails it.
  for seed in (1, 2):
    del s["cells"][f"pgd_at_s{seed}"]
  met, said = study_report.gate(s)
  assert met is None and "met provisionally" in said
  assert "<= 49.90 % AutoAttack (APGD-CE + APGD-T only, n=2000)" in said
  by["pgd_at"][:400] = "apgd-t"
  s["cells"]["pgd_at_s0"]["autoattack"] = [
      {"role": "main", **_cut_result(by["pgd_at"], ("apgd-ce", "apgd-t"))}]
  met, said = study_report.gate(s)
  assert met is False and "**not met**" in said and "<= 40.40 % AutoAttack" in said


def test_claim_2_is_read_off_the_margins():
  """Is PGD-AT two-peaked; does SOVR's switched set end with larger margins?"""
  s = _fake_study()
  rng = np.random.default_rng(5)
  two_peaks = np.r_[rng.normal(-2.0, 0.5, 800), rng.normal(1.5, 0.7, 1200)]
  s["cells"]["pgd_at_s0"]["margins"] = {"margins": two_peaks.tolist()}
  s["cells"]["sovr_s0"]["margins"] = {"margins": (two_peaks + 0.5).tolist()}
  reading = study_report.claim2(s)
  assert reading.startswith("Seed 0: PGD-AT's margins have 2 peaks (two-peaked)")
  assert ": +0.50 +- " in reading  # the 40 % smallest, shifted by 0.5
  table = study_report.tables(s)
  assert "Claim 2: Seed 0" in table and "| PGD-AT | 2000 |" in table and "| 2 (" in table


def test_merge_adds_cells_and_keeps_a_trained_cell_over_a_failed_rerun(tmp_path):
  into = str(tmp_path / "study.json")
  a = {"scale": "full", "cells": {"pgd_at_s0": {"test": {"best": 1}}}, "command": "a",
       "created": "t0"}
  json.dump(study.merge(into, a), open(into, "w"))
  b = {"scale": "full", "cells": {"pgd_at_s0": {"status": "failed"}, "sovr_s0": {"test": 2}},
       "command": "b", "created": "t1"}
  merged = study.merge(into, b)
  assert merged["cells"]["pgd_at_s0"] == {"test": {"best": 1}} and "sovr_s0" in merged["cells"]
  assert merged["merges"][0]["cells"] == ["pgd_at_s0", "sovr_s0"]
  with pytest.raises(ValueError, match="one schedule"):
    study.merge(into, {**b, "scale": "gpu"})


def test_a_rerun_cut_short_never_replaces_a_finished_cell_and_nothing_trained_is_dropped(
    tmp_path):
  """A second GPU session that trains a cell again and has its AutoAttack cut keeps the first
  session's complete cell; a rerun that gets as far replaces it. The run not kept is in
  set_aside either way."""
  into = str(tmp_path / "study.json")
  full = {"test": {"best": {"clean_acc": 0.8}}, "autoattack": [_fake_result([1, 0, 1, 1])]}
  cut = {"test": {"best": {"clean_acc": 0.81}},
         "autoattack": [_cut_result(["", "apgd-ce"] * 2, ("apgd-ce",))]}
  assert study.completeness(full) > study.completeness(cut) > study.completeness({})
  first = {"scale": "full", "cells": {"pgd_at_s0": full}, "command": "a", "created": "t0"}
  json.dump(study.merge(into, first), open(into, "w"))
  said = []
  merged = study.merge(into, {"scale": "full", "cells": {"pgd_at_s0": cut}, "command": "b",
                              "created": "t1"}, log=said.append)
  assert merged["cells"]["pgd_at_s0"] == full
  assert merged["set_aside"]["pgd_at_s0"][0]["test"] == cut["test"]
  assert "kept the earlier run" in said[0]
  json.dump(merged, open(into, "w"))
  again = {**full, "test": {"best": {"clean_acc": 0.79}}}
  merged = study.merge(into, {"scale": "full", "cells": {"pgd_at_s0": again}, "command": "c",
                              "created": "t2"}, log=said.append)
  assert merged["cells"]["pgd_at_s0"] == again  # as far: the newer run
  assert [c["test"] for c in merged["set_aside"]["pgd_at_s0"]] == [cut["test"], full["test"]]


def test_gpu_study_script_at_tiny_scale(tmp_path):
  """scripts/gpu_study.sh end to end on the CPU: two cells trained at once, the JAX AutoAttack
  on each, both engines side by side on one, one JSON per cell as soon as it is done, the
  batch's JSON, merged into a study, plotted."""
  out_dir, work = tmp_path / "out", tmp_path / "runs"
  out_dir.mkdir()
  check_engines = references.have("torch", "pyautoattack")  # always in CI
  env = dict(os.environ, OUT=str(out_dir), SCALE="tiny", RUNS="pgd_at", SEEDS="0,1",
             CHECK="pgd_at_s1" if check_engines else "", N="16", CHECK_N="16", ATTACKS="apgd-ce",
             DEADLINE="900", ATTACK_S="300", AA_BATCH="16", WORK=str(work),
             DATA=_small_cifar_tarball(tmp_path / "cifar10-jpeg.tar.gz"),
             CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_study.sh")], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert sorted(os.listdir(out_dir / "cells")) == ["pgd_at_s0.json", "pgd_at_s1.json"]
  batch = json.loads((out_dir / "study_tiny.json").read_text())
  for name, cell in batch["cells"].items():
    assert [c["epoch"] for c in cell["curves"]] == [1, 2] and cell["seed"] == int(name[-1])
    assert cell["test"]["final"]["n"] == 64 and cell["versions"]["jax"]
    assert len(cell["margins"]["margins"]) == 64
    main = [r for r in cell["autoattack"] if r["role"] == "main"]
    assert len(main) == 1 and main[0]["n"] == 16 and len(main[0]["points"]["robust"]) == 16
  if check_engines:
    check = batch["cells"]["pgd_at_s1"]
    assert {r["engine"] for r in check["autoattack"] if r["role"] == "check"} == {
        "jax", "reference"}
    assert check["autoattack_check"]["rows"][0]["attack"] == "clean"
  # Rerunning the driver finds everything done: nothing is retrained or re-attacked.
  again = study.main([f"--config={REPO}/configs/study.py", "--scale=tiny", f"--workdir={work}",
                      f"--out={tmp_path / 'again.json'}",
                      "--runs=pgd_at", "--seeds=0,1", "--n=16", "--attacks=apgd-ce",
                      "--data=/nonexistent"])
  assert all(c["status"] is None for c in again["cells"].values())
  into = str(tmp_path / "study.json")
  study.main(["--merge_from", str(out_dir / "cells" / "pgd_at_s0.json"),
              str(out_dir / "study_tiny.json"), "--into", into])
  written = study_report.main(["--study", into, "--out", str(tmp_path / "fig")])
  assert {os.path.basename(p) for p in written} == {"fig_margins.png", "fig_curves.png",
                                                    "fig_table.md"}
  table = (tmp_path / "fig_table.md").read_text()
  assert "| PGD-AT | 0,1 |" in table
  assert "<= " in table and "(APGD-CE, JAX, n=16)" in table  # a subset: an upper bound
