"""The training loop end to end on tiny configs: outputs, resume, failures."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from sovr_jax import checkpoint, experiment, train
from sovr_jax.errors import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  cfg = tiny.get_config()
  for k, v in overrides.items():
    sec, _, field = k.partition("__")
    if field:
      cfg[sec][field] = v
    else:
      cfg[sec] = v
  return cfg


def _final_params(cfg, workdir):
  """Params of the newest checkpoint in workdir, restored into cfg's model."""
  ds = experiment.load_data(cfg)
  model = experiment.build_model(cfg, ds)
  target = train.create_train_state(jax.random.PRNGKey(0), model, ds.image_shape,
                                    train.make_optimizer(cfg, lambda s: 0.1))
  state, meta = checkpoint.Checkpointer(workdir).restore(target)
  return state, meta


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  cfg = _cfg()
  report = experiment.train_and_evaluate(cfg, workdir)
  return cfg, workdir, report


def test_run_writes_report_metrics_checkpoints_and_plot(tiny_run):
  cfg, workdir, report = tiny_run
  for name in ("config.json", "metrics.jsonl", "report.json", "margins.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "report.json")) as f:
    on_disk = json.load(f)
  assert on_disk["method"] == "sovr" and on_disk["seed"] == cfg.seed
  for which in ("final", "best"):
    r = on_disk["test"][which]
    assert r["n"] == 64
    for k in ("clean_acc", "pgd_acc", "cw_acc"):
      assert 0.0 <= r[k] <= 1.0
    # A PGD attack can only lower accuracy (same points, attack from the ball).
    assert r["pgd_acc"] <= r["clean_acc"]
  assert "upper bound" in on_disk["note"]
  assert {"jax", "flax", "optax"} <= set(on_disk["versions"])
  # The CPU too: XLA compiles for the host's vector extensions, so a CPU-trained model's figures
  # depend on it (the quickstart's differ by 0.1 to 1.0 points between two CPUs, README).
  assert on_disk["cpu"]["model"] and on_disk["cpu"]["cores"] == os.cpu_count()
  assert on_disk["timings"]["train_s"] > 0
  hist = on_disk["margins"]["histogram"]
  assert sum(hist["small_margin"]) + sum(hist["other"]) <= 64
  assert on_disk["margins"]["mean_small_margin"] <= on_disk["margins"]["mean_other"]
  # The margins are measured on a sample of every class (the split is ordered by class).
  with open(os.path.join(workdir, "margins.json")) as f:
    classes = json.load(f)["classes"]
  assert sum(classes) == on_disk["margins"]["n"] and np.count_nonzero(classes) >= 5, classes
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [l for l in lines if "loss" in l]
  epochs = [l for l in lines if "epoch_time_s" in l]
  assert len(epochs) == 2 and epochs[-1]["step"] == 16
  assert all(np.isfinite(l["loss"]) for l in steps)
  assert {"adv_acc", "clean_acc", "margin", "switched", "lr"} <= set(steps[0])
  assert steps[0]["switched"] == pytest.approx(np.ceil(0.4 * 32) / 32)
  assert len(glob.glob(os.path.join(workdir, "best", "*"))) == 1


def test_rerun_of_a_finished_run_resumes_without_training(tiny_run, capsys):
  cfg, workdir, report = tiny_run
  again = experiment.train_and_evaluate(cfg, workdir)
  assert "Resumed" in capsys.readouterr().out
  assert again["test"]["final"]["clean_acc"] == report["test"]["final"]["clean_acc"]


def test_workdir_of_a_different_model_is_refused(tiny_run):
  cfg, workdir, _ = tiny_run
  other = _cfg(model__width=0.5)
  with pytest.raises(WorkdirError, match=r"model.width: 0.25 in the run, 0.5 now"):
    experiment.train_and_evaluate(other, workdir)


def test_model_that_cannot_take_the_images_is_a_clear_error(tmp_path):
  cfg = _cfg(data__name="digits")  # 8x8 images through SmallCNN's two valid-conv + pool stages
  with pytest.raises(ValueError, match="cannot take digits images"):
    experiment.train_and_evaluate(cfg, str(tmp_path))


def test_missing_dataset_error_says_how_to_fix(tmp_path):
  cfg = _cfg(data__source="image_folder", data__name="cifar10",
             data__path=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    experiment.train_and_evaluate(cfg, str(tmp_path / "w"))


def test_tfds_mock_data_feeds_the_loop(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(data__source="tfds", data__name="cifar10", data__data_dir=str(tmp_path / "tfds"),
             data__val_size=16, data__num_train=0, data__num_test=0, train__epochs=1,
             data__flip=True)
  with tfds.testing.mock_data(num_examples=80, policy=tfds.testing.MockPolicy.USE_CODE):
    report = experiment.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert report["dataset"] == "cifar10"
  assert report["test"]["final"]["n"] == 80


def test_image_folder_feeds_the_loop(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "folder"
  for split, per_class in (("train", 24), ("test", 8)):
    for cls in ("cat", "dog"):
      os.makedirs(root / split / cls)
      for i in range(per_class):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / split / cls / f"{i}.png")
  cfg = _cfg(data__source="image_folder", data__name="pets", data__path=str(root),
             data__cache_dir=str(tmp_path / "cache"), data__val_size=8, data__num_train=0,
             data__num_test=0, train__epochs=1, train__batch_size=8, eval__batch_size=8,
             model__name="small_cnn", model__width=0.25)  # SmallCNN takes 16x16 images
  report = experiment.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert report["test"]["final"]["n"] == 16


_KILL_ARGS = ["--config", "configs/tiny.py", "--config.train.epochs=4",
              "--config.eval.every_epochs=1"]


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(tmp_path):
  """Kill -9 the CLI right after its first checkpoint; the rerun must resume
  and end with exactly the parameters of an uninterrupted run (which trains alongside)."""
  killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
  cmd = [sys.executable, "-m", "sovr_jax.main"] + _KILL_ARGS
  ref = subprocess.Popen(cmd + ["--workdir", clean], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(cmd + ["--workdir", killed], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  first = os.path.join(killed, "checkpoints", "8")
  while not os.path.isdir(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(first), "no checkpoint was written before the deadline"
  assert not os.path.exists(os.path.join(killed, "report.json")), "killed too late"
  resumed = subprocess.run(cmd + ["--workdir", killed], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resumed from" in resumed.stdout
  _, err = ref.communicate(timeout=600)
  assert ref.returncode == 0, err[-2000:]
  cfg = _cfg(train__epochs=4)
  a, _ = _final_params(cfg, killed)
  b, _ = _final_params(cfg, clean)
  assert int(a.step) == int(b.step) == 32
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    epochs = [json.loads(l)["epoch"] for l in f if "epoch_time_s" in l]
  assert epochs == [1, 2, 3, 4]  # no duplicated lines after the resume


def test_steps_per_dispatch_gives_the_same_run(tiny_run, tmp_path):
  """8 steps/epoch in dispatches of 3, 3, 2 == 8 single-step dispatches."""
  cfg, workdir, _ = tiny_run
  multi = _cfg(train__steps_per_dispatch=3)
  experiment.train_and_evaluate(multi, str(tmp_path))
  a, _ = _final_params(cfg, workdir)
  b, _ = _final_params(multi, str(tmp_path))
  assert int(a.step) == int(b.step) == 16
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_rescoring_the_best_checkpoint_without_a_recorded_attack_or_readable_checkpoint(capsys):
  """_rescore_best on a checkpoint of the code before 2026-12-03 (no best_val_setting: scored
  once with this run's attack), on one that recorded this attack (nothing to do), and when the
  best checkpoint cannot be read (the best-by-validation choice starts again)."""
  import types  # pylint: disable=import-outside-toplevel
  from sovr_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  cfg = tiny.get_config()
  ds = types.SimpleNamespace(val_images="x", val_labels="y")
  best_state = types.SimpleNamespace(params="p", batch_stats="b")
  calls = []

  def val_eval(variables, images, labels, seed):
    calls.append((variables, images, labels, seed))
    return {"pgd_acc": 0.25}

  class Ckpt:
    def __init__(self, fail=False):
      self.fail = fail

    def restore(self, target, best):
      assert best
      if self.fail:
        raise CheckpointError("no readable best checkpoint")
      return best_state, {}

  meta = {"epoch": 4, "best_epoch": 3, "best_val_pgd": 0.5}
  experiment._rescore_best(cfg, Ckpt(), None, meta, val_eval, ds)
  assert calls == [({"params": "p", "batch_stats": "b"}, "x", "y", cfg.seed)]
  assert meta == {"epoch": 4, "best_epoch": 3, "best_val_pgd": 0.25,
                  "best_val_setting": experiment._val_setting(cfg)}
  assert "does not record the validation attack that scored it; with this run's (PGD-3, " \
         "step 0.025) its validation PGD accuracy is 0.2500 (was 0.5000)" in capsys.readouterr().out
  experiment._rescore_best(cfg, Ckpt(fail=True), None, meta, val_eval, ds)  # recorded: no call
  assert len(calls) == 1 and meta["best_val_pgd"] == 0.25
  meta.pop("best_val_setting")
  experiment._rescore_best(cfg, Ckpt(fail=True), None, meta, val_eval, ds)
  assert meta == {"epoch": 4, "best_epoch": -1, "best_val_pgd": -1.0} and len(calls) == 1
  assert "starts again from epoch 5" in capsys.readouterr().out
