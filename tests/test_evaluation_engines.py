"""Both AutoAttack engines on the same tiny MLP: the same schema, results that agree, the
reference's resume after an interruption, and the side-by-side comparison."""

import json
import os

import numpy as np
import pytest

from sovr_jax.attacks.autoattack import ensemble
from sovr_jax.evaluation import compare, jax_engine, reference, schema, settings, targets
from tests import references

references.skip_module_without("torch", "pyautoattack")  # every test runs both engines
import torch  # pylint: disable=wrong-import-position,wrong-import-order

N, EPS, SEED, BATCH = 120, 0.02, 0, 64
ATTACKS = settings.STANDARD_ATTACKS


@pytest.fixture(scope="module")
def target():
  return targets.tiny_mlp(N, seed=SEED, eps=EPS)


@pytest.fixture(scope="module")
def results(target, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("engines") / "ref.json")
  kw = dict(attacks=ATTACKS, seed=SEED, batch_size=BATCH, settings=settings.FAST,
            version="custom", log=lambda _: None)
  return {"jax": jax_engine.run(target, **kw),
          "reference": reference.run(target, device="cpu", out=out, **kw)}


@pytest.mark.parametrize("engine", ["jax", "reference"])
def test_each_engine_writes_the_schema(results, engine):
  r = results[engine]
  schema.validate(r)
  assert r["engine"] == engine and r["n"] == N and r["clean_acc"] == 1.0
  assert r["points_sha256"] == targets.tiny_mlp(N, seed=SEED, eps=EPS).points_sha256
  assert r["attacks"] == list(ATTACKS) and r["settings"]["n_iter"] == settings.FAST.n_iter
  p = schema.decode_points(r)
  before = N
  for e in r["per_attack"]:  # each attack ran on exactly the points still robust
    assert e["points_attacked"] == before
    assert e["points_broken"] == int(np.sum(p["broken_by"] == e["attack"]))
    before -= e["points_broken"]
    assert e["robust_acc"] == pytest.approx(before / N)
  assert r["robust_acc"] == pytest.approx(p["robust"].mean()) == pytest.approx(before / N)
  c = r["checks"]
  assert c["within_eps"] and c["in_unit_range"] and c["finite"]
  assert c["broken_misclassified"] and c["flags_disagree"] == 0
  assert c["max_perturbation"] <= EPS + ensemble.EPS_ATOL
  assert json.loads(json.dumps(r)) == r


def test_engines_agree_on_the_same_points(results):
  cmp = compare.compare(results["jax"], results["reference"])
  rows = {r["attack"]: r for r in cmp["rows"]}
  assert set(rows) == {"clean", "total", *ATTACKS}
  assert rows["clean"]["diff"] == 0.0
  assert abs(rows["square"]["diff"]) <= 0.05  # the final robust accuracy
  assert cmp["robust_flag_agreement"] >= 0.93
  assert cmp["mcnemar_jax_vs_reference"]["p_value"] > 0.01
  assert all(rows[a]["jax_time_s"] > 0 and rows[a]["ref_time_s"] > 0 for a in ATTACKS)
  assert "per-point agreement" in compare.format_table(cmp)
  other = {**results["reference"], "points_sha256": targets.tiny_mlp(N, seed=SEED + 1,
                                                                    eps=EPS).points_sha256}
  with pytest.raises(ValueError, match="not on the same points.*other points"):
    compare.compare(results["jax"], other)


def test_reference_resumes_after_an_interruption(target, tmp_path, monkeypatch):
  """A crash inside APGD-T: the progress record keeps APGD-CE's flags, pyautoattack's state
  the flags APGD-T had reached; the rerun finishes from there and counts those points."""
  from pyautoattack import autopgd_base  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "r.json")
  kw = dict(attacks=("apgd-ce", "apgd-t"), seed=SEED, batch_size=32, settings=settings.FAST,
            version="custom", device="cpu", out=out, log=lambda _: None)
  real, calls = autopgd_base.APGDAttack_targeted.perturb, []

  def crash_on_second_batch(self, x, y, *a, **k):
    calls.append(len(x))
    if len(calls) == 2:
      raise RuntimeError("simulated crash in apgd-t")
    return real(self, x, y, *a, **k)

  with monkeypatch.context() as m:
    m.setattr(autopgd_base.APGDAttack_targeted, "perturb", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
      reference.run(target, **kw)
  state_path, progress_path = reference.resume_paths(out)
  with open(progress_path) as f:
    progress = json.load(f)
  assert list(progress["finished"]) == ["apgd-ce"] and progress["current"] == "apgd-t"
  assert state_path.exists()
  with pytest.raises(Exception, match=r"other settings \(eps\).*--fresh"):
    reference.run(targets.tiny_mlp(N, seed=SEED, eps=0.03), **kw)
  r = reference.run(target, **kw)
  assert r["checks"]["resumed"] and r["checks"]["sessions"] == 2
  after_ce = progress["finished"]["apgd-ce"]["robust_acc"]
  assert r["robust_acc_after"]["apgd-ce"] == pytest.approx(after_ce)
  assert r["robust_acc"] <= after_ce and r["checks"]["flags_disagree"] == 0
  reference.clear_resume_files(out)
  assert not state_path.exists() and not progress_path.exists()
  fresh = reference.run(target, **kw)
  assert fresh["robust_acc"] == pytest.approx(r["robust_acc"], abs=2 / N)
  os.remove(str(progress_path))


def test_jax_engine_writes_a_partial_result_after_each_attack(target, tmp_path):
  """A run cut by a time limit keeps the attacks that finished: after each attack but the
  last, an incomplete result (robust_acc null, the flags an upper bound) is on disk."""
  partial = str(tmp_path / "partial.json")
  final = jax_engine.run(target, attacks=("apgd-ce", "square"), seed=SEED, batch_size=BATCH,
                         settings=settings.FAST, version="custom", log=lambda _: None,
                         partial_out=partial)
  cut = schema.read(partial)  # as a run killed during Square leaves it
  assert not cut["complete"] and cut["robust_acc"] is None
  assert [e["attack"] for e in cut["per_attack"]] == ["apgd-ce"]
  after_ce = final["robust_acc_after"]["apgd-ce"]
  assert cut["robust_acc_after"]["apgd-ce"] == after_ce
  assert schema.decode_points(cut)["robust"].mean() == pytest.approx(after_ce)
  assert final["complete"] and final["robust_acc"] <= after_ce
