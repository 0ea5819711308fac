"""The result schema and the settings shared by both AutoAttack engines."""

import json

import numpy as np
import pytest

from sovr_jax.errors import ConfigError
from sovr_jax.evaluation import schema, settings, targets


def _result(n=6):
  clean = np.array([1, 1, 1, 1, 0, 1], bool)[:n]
  robust = np.array([1, 0, 0, 1, 0, 0], bool)[:n]
  broken_by = ["", "apgd-ce", "apgd-t", "", "", "square"][:n]
  per_attack = [schema.attack_entry(a, robust_acc=acc, attacked=k, broken=b, time_s=1.0)
                for a, acc, k, b in (("apgd-ce", 4 / 6, 5, 1), ("apgd-t", 3 / 6, 4, 1),
                                     ("fab-t", 3 / 6, 3, 0), ("square", 2 / 6, 3, 1))]
  return schema.build("jax", version="standard", attacks=settings.STANDARD_ATTACKS,
                      clean=clean, robust=robust, broken_by=broken_by, per_attack=per_attack,
                      eps=8 / 255, norm="linf", seed=0, batch_size=6, settings={},
                      checks={}, model={"architecture": "x"}, dataset="cifar10")


def test_points_round_trip_and_the_accuracies_follow_from_them(tmp_path):
  r = _result()
  assert r["points"] == {"clean": "111101", "robust": "100100", "broken_by": ".01..3"}
  assert r["clean_acc"] == pytest.approx(5 / 6) and r["robust_acc"] == pytest.approx(2 / 6)
  assert r["robust_acc_after"]["square"] == pytest.approx(2 / 6)
  assert r["total_time_s"] == 4.0 and {"versions", "command", "created"} <= set(r)
  path = str(tmp_path / "r.json")
  schema.write(path, r)
  back = schema.read(path)
  p = schema.decode_points(back)
  assert list(p["broken_by"]) == ["", "apgd-ce", "apgd-t", "", "", "square"]
  assert p["robust"].tolist() == [True, False, False, True, False, False]
  assert "points" not in schema.summary(back) and schema.summary(back)["n"] == 6


def test_inconsistent_points_and_foreign_files_are_refused(tmp_path):
  with pytest.raises(ValueError, match="same points"):
    schema.build("jax", version="custom", attacks=("apgd-ce",), clean=[False], robust=[True],
                 broken_by=[""], per_attack=[], eps=0.1, norm="linf", seed=0, batch_size=1,
                 settings={}, checks={}, model={}, dataset=None)
  path = tmp_path / "old.json"
  path.write_text(json.dumps({"clean_acc": 0.5, "robust_acc": 0.4}))
  with pytest.raises(Exception, match="older version"):
    schema.read(str(path))


def test_results_are_comparable_only_on_the_same_points_and_threat_model():
  x = np.zeros((6, 2, 2, 1), np.float32)
  t = targets.Target(x=x, y=np.arange(6), eps=8 / 255, norm="linf", num_classes=10, info={})
  moved = targets.Target(x=x + np.float32(1 / 255), y=np.arange(6), eps=8 / 255, norm="linf",
                         num_classes=10, info={})
  reordered = targets.Target(x=x, y=np.arange(6)[::-1].copy(), eps=8 / 255, norm="linf",
                             num_classes=10, info={})
  assert len({t.points_sha256, moved.points_sha256, reordered.points_sha256}) == 3
  a = {**_result(), "points_sha256": t.points_sha256}
  assert schema.comparable(a, dict(a)) is None
  assert schema.comparable(a, {**a, "points_sha256": None}) is None  # an older result
  for change, words in (({"n": 5}, "n 6 against 5"), ({"eps": 4 / 255}, "eps"),
                        ({"norm": "l2"}, "l2"), ({"dataset": "svhn"}, "data set"),
                        ({"points_sha256": moved.points_sha256}, "other points")):
    assert words in schema.comparable(a, {**a, **change}), change


def test_settings_and_parsing():
  assert settings.parse_eps("8/255") == pytest.approx(8 / 255)
  assert settings.parse_eps(0.5) == 0.5
  for bad in ("eight", "1/0", "inf"):
    with pytest.raises(ConfigError):
      settings.parse_eps(bad)
  with pytest.raises(ConfigError, match="did you mean --eps 8/255"):
    settings.check_eps(8.0, "linf")
  settings.check_eps(8.0, "l2")
  with pytest.raises(ConfigError, match="> 0"):
    settings.check_eps(0.0, "linf")
  assert settings.parse_attacks(None) == settings.STANDARD_ATTACKS
  assert settings.parse_attacks("APGD-CE, fab") == ("apgd-ce", "fab")
  with pytest.raises(ConfigError, match="valid attacks: apgd-ce"):
    settings.parse_attacks("apgd-xx")
  with pytest.raises(ConfigError, match="twice"):
    settings.parse_attacks("fab,fab")
  s = settings.Settings()
  assert s.is_standard and s.for_classes(3).n_target_classes == 2 and s.for_classes(100) == s
  assert settings.version(settings.STANDARD_ATTACKS, s) == "standard"
  assert settings.version(settings.STANDARD_ATTACKS, settings.FAST) == "custom"
  assert settings.version(("apgd-ce",), s) == "custom"
